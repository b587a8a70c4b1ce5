"""Answer extraction, equivalence and the pass@k estimator (against brute-force combinatorics)."""
from __future__ import annotations

import itertools
import math
import threading
import time
from fractions import Fraction

import pytest

from rast_engine.evaluation import extract_answer, is_equivalent, pass_at_k
from rast_engine.evaluation.grading import canonical_key


@pytest.mark.parametrize("text, expected", [
    (r"so the answer is \boxed{\frac{1}{\sqrt{2}}}.", r"\frac{1}{\sqrt{2}}"),
    (r"\boxed{1} then, correcting myself, \boxed{ {a}_{b}^{ {2} } }", r"{a}_{b}^{ {2} }"),
    (r"first \boxed{3}, finally \fbox{x^{2}+1}", r"x^{2}+1"),
    (r"\boxed{12} and then an unfinished \boxed{\frac{1}{", "12"),
    (r"$\boxed 7$", "7"),
    (r"\boxed {\{1,2\}}", r"\{1,2\}"),
    ("It costs 1,234,567.25 dollars, earlier -4.", "-4"),
    ("We get 1,234,567.25 in total.", "1,234,567.25"),
    ("The temperature fell to -12 degrees", "-12"),
    ("no number at all", None),
    (r"Answer: \boxed{7}. (Put your final answer within \boxed{}.)", "7"),  # an echoed empty box answers nothing
    (r"\boxed{ }", None),
    ("", None),
])
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize("pred, truth", [
    ("1,000", "1000"),
    ("1000", "1,000"),
    (r"\frac{1}{2}", "0.5"),
    (r"\dfrac{3}{4}", "3/4"),
    (r"\tfrac12", r"\frac{1}{2}"),
    ("-\\frac{2}{6}", "-1/3"),
    ("50\\%", "50"),
    ("25%", "0.25"),
    ("10.0", "10"),
    ("-3", "-3.00"),
    ("$42$", "42"),
    (r"\text{(B)}", "B"),
    ("90^\\circ", "90"),
    ("x^2+2x+1", "(x+1)^2"),
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
    (r"\left(1, 2\right)", "(1,2)"),
    (r"\$18", "18"),  # GSM8K's dollars, escaped as LaTeX writes them
    (r"\$1{,}000.00", "1000"),
    (r"\$1,000", "1000"),
])
def test_equivalent(pred: str, truth: str) -> None:
    assert is_equivalent(pred, truth)


@pytest.mark.parametrize("pred, truth", [
    ("-3", "3"),
    ("0.333", r"\frac{1}{3}"),
    ("2", "x"),
    ("x^2+1", "(x+1)^2"),
    (r"\sqrt{2}", "2"),
    ("1001", "1,000"),
    (None, "1"),
    ("1", None),
    ("", "0"),
    (r"\frac{1}{", "}{"),
    (r"\boxed{\frac{", r"\sqrt{\sqrt{"),
])
def test_not_equivalent(pred: str | None, truth: str | None) -> None:
    assert not is_equivalent(pred, truth)


def test_equivalence_is_bounded_and_never_raises() -> None:
    start = time.monotonic()
    assert not is_equivalent("x^" * 5000 + "2", "y")
    assert not is_equivalent("\\" * 50, "{" * 50)
    assert is_equivalent("9" * 400, "9" * 400)
    assert not is_equivalent("(x+1)^{200}", "(x+2)^{200}")
    assert time.monotonic() - start < 20


def test_equivalence_off_the_main_thread() -> None:
    # math-verify's timeout needs signals, which only the main thread has; grading must still work.
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.extend(
        [is_equivalent("x^2+2x+1", "(x+1)^2"), is_equivalent("x^2", "(x+1)^2"), is_equivalent("1/2", "0.5")]))
    worker.start()
    worker.join()
    assert results == [True, False, True]
    # no timeout can stop sympy here: a power tower it would evaluate exactly is refused, not computed
    start = time.monotonic()
    tower = threading.Thread(target=lambda: results.extend(
        [is_equivalent("9^{9^{9}}", "1"), is_equivalent("2^{99999999}", "1"), is_equivalent("(10^{9})!", "1")]))
    tower.start()
    tower.join(60)
    assert not tower.is_alive() and results[3:] == [False] * 3 and time.monotonic() - start < 30


def test_canonical_key_merges_equal_numbers() -> None:
    assert canonical_key("0.5") == canonical_key(r"\frac{1}{2}") == canonical_key("$1/2$")
    assert canonical_key("1,000") == canonical_key("1000") == canonical_key("1{,}000") == canonical_key("+1000")
    assert canonical_key("50%") == canonical_key("50\\%") != canonical_key("50")
    assert canonical_key("2") != canonical_key("3")
    assert canonical_key(None) is None and canonical_key("$ $") is None  # nothing left: no answer, no vote
    # the typeset minus U+2212 is "-": the sign is kept, and both spellings vote together
    assert canonical_key("\u22125") == canonical_key("-5") != canonical_key("5")
    assert extract_answer("the result is \u22125.") == "-5" and is_equivalent("\u22125", "-5")
    assert not is_equivalent(extract_answer("the result is \u22125."), "5")


def _brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The probability that a uniformly drawn k-subset of n samples (c correct) holds a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


def test_pass_at_k_matches_brute_force() -> None:
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_brute_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_large_n_is_stable() -> None:
    for n, c, k in [(1024, 1, 1), (1024, 3, 512), (4096, 7, 100), (2000, 1999, 1000), (10_000, 2, 5000)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-10, abs=1e-15)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5), (0, 0, 1)])
def test_pass_at_k_rejects_bad_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)
