"""The paper's evaluation metrics over n graded samples per problem (Sec. 3.1, App. C).

- avg pass@1: the mean over problems of c/n (the paper's "Accuracy", averaged over its 32 runs);
- pass@k: the unbiased estimator 1 - C(n-c, k)/C(n, k), averaged over problems;
- maj@k: whether the most frequent answer among a problem's first k samples is correct;
- mean response length in tokens, and the Fig. 9 reasoning-word frequencies per trajectory;
- the spread of avg pass@1: its standard error over problems (how far another draw of problems could move
  it), and the standard deviation over the n runs (run j: every problem's j-th sample), the paper's Fig. 6
  circles. Both use the n − 1 (N − 1) denominator and are 0 for a single run (problem).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rast_engine.evaluation.grading import canonical_key, pass_at_k
from rast_engine.evaluation.reasoning_words import word_frequencies


@dataclass(frozen=True)
class GradedSample:
    """One sampled completion with its extracted answer and grade."""

    text: str
    answer: str | None
    correct: bool
    num_tokens: int

    def __post_init__(self) -> None:
        if self.num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {self.num_tokens}")


def ks_for(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n, and n itself when it is not a power of two."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def majority_correct(samples: Sequence[GradedSample], k: int) -> bool:
    """Majority vote over the first k samples. Equal answers share a canonical key; samples without an
    answer do not vote; a tie goes to the answer that reached the top count first (so the vote does not
    depend on hash order). Grading of the winner reuses its sample's own grade."""
    counts: dict[str, int] = {}
    first: dict[str, GradedSample] = {}
    best_key, best_count = None, 0
    for s in samples[:k]:
        key = canonical_key(s.answer)
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, s)
        if counts[key] > best_count:
            best_key, best_count = key, counts[key]
    return best_key is not None and first[best_key].correct


def sample_std(xs: Sequence[float]) -> float:
    """The standard deviation with the n − 1 denominator (0 for fewer than two values)."""
    if len(xs) < 2:
        return 0.0
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def compute_metrics(problems: Sequence[Sequence[GradedSample]], ids: Sequence[str] | None = None) -> dict:
    """All metrics for a dataset; every problem must have the same number n of samples. With the problems'
    ``ids``, also each one's count of correct samples (`rast eval compare` pairs runs problem by problem)."""
    if not problems:
        raise ValueError("no problems to score")
    n = len(problems[0])
    if n == 0 or any(len(p) != n for p in problems):
        sizes = sorted({len(p) for p in problems})
        raise ValueError(f"every problem needs the same number (>= 1) of samples, got sizes {sizes}")
    num = len(problems)
    ks = ks_for(n)
    correct = [sum(s.correct for s in p) for p in problems]
    samples = [s for p in problems for s in p]
    return {
        "num_problems": num,
        "n": n,
        "avg_pass@1": sum(c / n for c in correct) / num,
        "avg_pass@1_stderr": sample_std([c / n for c in correct]) / math.sqrt(num),
        "pass@1_std_over_runs": sample_std([sum(p[j].correct for p in problems) / num for j in range(n)]),
        "pass@k": {str(k): sum(pass_at_k(n, c, k) for c in correct) / num for k in ks},
        "maj@k": {str(k): sum(majority_correct(p, k) for p in problems) / num for k in ks},
        "mean_response_tokens": sum(s.num_tokens for s in samples) / len(samples),
        "no_answer_rate": sum(s.answer is None for s in samples) / len(samples),
        "reasoning_words": word_frequencies(s.text for s in samples),
        **({} if ids is None else {"correct_by_problem": dict(zip(ids, correct))}),
    }
