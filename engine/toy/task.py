"""The toy task: add two 5-digit numbers.

A prompt is ``"47256+38691="``. A completion takes one of two paths, and the first completion
character alone says which (the behaviour RL selects is a single token, like "wait" in the paper):

- direct:  ``"85947"`` — the answer at once, most significant digit first, so every digit needs the
  carry chain from all lower columns resolved in one shot (error-prone for a small model);
- careful: ``"[6+1+0=07,5+9+0=14,2+6+1=09,7+8+0=15,4+3+1=08]85947"`` — one fixed-width step per
  column from the units up (digit + digit + carry-in = two-digit sum), then the answer, each answer
  digit being a copy of a units digit already written (accurate, and rarer in pretraining).

The final answer is whatever follows ``]`` on the careful path, or follows ``=`` on the direct path.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

N_DIGITS = 5
CAREFUL_OPEN = "["
CAREFUL_CLOSE = "]"
ALPHABET = "0123456789+=[],"


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    def __post_init__(self) -> None:
        lo, hi = 10 ** (N_DIGITS - 1), 10**N_DIGITS
        if not (lo <= self.a < hi and lo <= self.b < hi):
            raise ValueError(f"operands must have exactly {N_DIGITS} digits, got {self.a} and {self.b}")

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    def direct(self) -> str:
        return self.answer

    def careful(self) -> str:
        da, db = str(self.a)[::-1], str(self.b)[::-1]
        steps, carry = [], 0
        for x, y in zip(da, db):
            s = int(x) + int(y) + carry
            steps.append(f"{x}+{y}+{carry}={s:02d}")
            carry = s // 10
        return CAREFUL_OPEN + ",".join(steps) + CAREFUL_CLOSE + self.answer


def sample_problem(rng: random.Random) -> Problem:
    lo, hi = 10 ** (N_DIGITS - 1), 10**N_DIGITS - 1
    return Problem(rng.randint(lo, hi), rng.randint(lo, hi))


def sample_problems(rng: random.Random, count: int, exclude: set[tuple[int, int]]) -> list[Problem]:
    """``count`` training problems, none of them in ``exclude`` (the held-out set)."""
    problems: list[Problem] = []
    while len(problems) < count:
        p = sample_problem(rng)
        if (p.a, p.b) not in exclude:
            problems.append(p)
    return problems


def parse_prompt(prompt: str) -> Problem:
    """Inverse of ``Problem.prompt``; raises ValueError on anything else."""
    if not prompt.endswith("="):
        raise ValueError(f"not a toy prompt: {prompt!r}")
    left, sep, right = prompt[:-1].partition("+")
    if not sep or not left.isdigit() or not right.isdigit():
        raise ValueError(f"not a toy prompt: {prompt!r}")
    return Problem(int(left), int(right))


def is_careful(completion: str) -> bool:
    return completion.startswith(CAREFUL_OPEN)


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion, or None when it is malformed (no answer, stray characters)."""
    if is_careful(completion):
        head, sep, tail = completion.partition(CAREFUL_CLOSE)
        if not sep:
            return None
        completion = tail
    return completion if completion.isdigit() else None


def is_correct(problem: Problem, completion: str) -> bool:
    """Reward: the final answer equals a + b exactly; the careful steps themselves are not graded."""
    return extract_answer(completion) == problem.answer


def heldout_problems(count: int, seed: int, exclude: set[tuple[int, int]] | None = None) -> list[Problem]:
    """Distinct problems from their own seed; ``exclude`` keeps them out of a training set."""
    rng, seen, out = random.Random(seed), set(exclude or ()), []
    while len(out) < count:
        p = sample_problem(rng)
        if (p.a, p.b) not in seen:
            seen.add((p.a, p.b))
            out.append(p)
    return out
