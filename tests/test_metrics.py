"""The paper's metrics on constructed samples, checked against direct counting."""
from __future__ import annotations

import itertools
import statistics
import json
from fractions import Fraction
from pathlib import Path

import pytest

from rast_engine.errors import RastError
from rast_engine.evaluation import extract_answer, is_equivalent
from rast_engine.evaluation.data import load_problems
from rast_engine.evaluation.metrics import GradedSample, compute_metrics, ks_for, majority_correct
from rast_engine.evaluation.reasoning_words import REASONING_WORDS, count_words, word_frequencies

SAMPLE_FILE = Path(__file__).resolve().parents[1] / "engine" / "evaluation" / "data" / "sample.jsonl"


def graded(answers: list[str | None], truth: str, tokens: int = 3, text: str = "") -> list[GradedSample]:
    return [GradedSample(text, a, is_equivalent(a, truth), tokens) for a in answers]


def test_ks_for() -> None:
    assert ks_for(32) == [1, 2, 4, 8, 16, 32]
    assert ks_for(6) == [1, 2, 4, 6]
    assert ks_for(1) == [1]
    with pytest.raises(ValueError):
        ks_for(0)


def test_majority_vote_on_constructed_samples() -> None:
    samples = graded(["2", "3", "3", "2", "2", None, None, None], truth="2")
    assert majority_correct(samples, 1)        # {2}
    assert majority_correct(samples, 2)        # 2 and 3 tie; 2 reached the top count first
    assert not majority_correct(samples, 3)    # 3 twice
    assert not majority_correct(samples, 4)    # 3 reached two votes before 2 did
    assert majority_correct(samples, 5)        # 2 three times
    assert majority_correct(samples, 8)        # unanswered samples do not vote
    assert not majority_correct(graded([None, None], truth="1"), 2)


def test_majority_vote_merges_equal_spellings() -> None:
    # 0.5, 1/2 and \frac{1}{2} are one answer with three votes against 0.25's two.
    samples = graded(["0.25", "0.5", "0.25", r"\frac{1}{2}", "1/2"], truth=r"\dfrac{1}{2}")
    assert not majority_correct(samples, 3)
    assert majority_correct(samples, 5)


def test_compute_metrics_against_direct_counting() -> None:
    truths = ["2", "7", "1/3", "10"]
    answers = [["2", "2", "5", "2"], ["1", "7", "1", "1"], [r"\frac{1}{3}", None, "0.3", r"\frac13"],
               ["9", "8", "7", "6"]]
    problems = [graded(a, t, tokens=10 * (i + 1)) for i, (a, t) in enumerate(zip(answers, truths))]
    m = compute_metrics(problems)
    correct = [3, 1, 2, 0]
    n = 4
    assert m["n"] == n and m["num_problems"] == 4
    assert m["avg_pass@1"] == pytest.approx(sum(Fraction(c, n) for c in correct) / 4)
    for k in (1, 2, 4):
        # pass@k as the fraction of k-subsets holding a correct sample, averaged over problems
        direct = 0.0
        for p in problems:
            subsets = list(itertools.combinations(p, k))
            direct += sum(any(s.correct for s in sub) for sub in subsets) / len(subsets)
        assert m["pass@k"][str(k)] == pytest.approx(direct / 4)
    assert set(m["pass@k"]) == set(m["maj@k"]) == {"1", "2", "4"}
    # maj@4: problem 1 (2 wins), problem 2 (1 wins: wrong), problem 3 (1/3 twice), problem 4 (9 first)
    assert m["maj@k"]["4"] == pytest.approx(2 / 4)
    assert m["maj@k"]["1"] == pytest.approx(2 / 4)  # first samples: 2 ok, 1 wrong, 1/3 ok, 9 wrong
    assert m["mean_response_tokens"] == pytest.approx((10 + 20 + 30 + 40) / 4)
    assert m["no_answer_rate"] == pytest.approx(1 / 16)
    # the spread, by the statistics module: over problems (standard error), and over runs (run j holds
    # every problem's j-th sample: 2, 2, 0 and 2 correct of 4)
    assert m["avg_pass@1_stderr"] == pytest.approx(statistics.stdev([c / n for c in correct]) / 2)
    assert m["pass@1_std_over_runs"] == pytest.approx(statistics.stdev([0.5, 0.5, 0.0, 0.5])) == 0.25
    assert "correct_by_problem" not in m
    ids = compute_metrics(problems, ["a", "b", "c", "d"])["correct_by_problem"]
    assert ids == dict(zip("abcd", correct))
    one = compute_metrics(problems[:1])
    assert one["avg_pass@1_stderr"] == 0.0  # one problem: no spread to estimate


def test_compute_metrics_rejects_ragged_samples() -> None:
    with pytest.raises(ValueError, match="same number"):
        compute_metrics([graded(["1"], "1"), graded(["1", "2"], "1")])
    with pytest.raises(ValueError):
        compute_metrics([])


def test_reasoning_words_are_the_papers_lists() -> None:
    assert REASONING_WORDS["branching_out"] == ("alternatively", "another", "try", "suppose", "consider",
                                                "different", "assume", "also", "option")
    assert REASONING_WORDS["backtracking"] == ("however", "but", "mistake", "error", "contradiction",
                                               "wrong", "revisit", "actually", "again", "flawed")
    assert REASONING_WORDS["self_verification"] == ("check", "verify", "confirm", "satisfy", "plug", "back",
                                                    "substitute", "ensure", "validate", "test")


def test_reasoning_word_counts_whole_words_case_insensitively() -> None:
    text = "But wait. Let me CHECK again; alternatively, try back-substitution. Backtrack? But retry: check."
    counts = count_words(text)
    assert counts["backtracking"]["but"] == 2 and counts["backtracking"]["again"] == 1
    assert counts["self_verification"]["check"] == 2 and counts["self_verification"]["back"] == 1
    assert counts["self_verification"]["substitute"] == 0  # "substitution" is another word
    assert counts["branching_out"]["try"] == 1 and counts["branching_out"]["alternatively"] == 1
    freqs = word_frequencies([text, "nothing here", "however"])
    assert freqs["backtracking"]["per_trajectory"] == pytest.approx((3 + 1) / 3)
    assert freqs["self_verification"]["per_trajectory"] == pytest.approx(3 / 3)
    assert freqs["branching_out"]["words"]["try"] == pytest.approx(1 / 3)


def test_shipped_sample_loads_and_grades_itself() -> None:
    problems = load_problems(SAMPLE_FILE)
    assert len(problems) >= 20 and len({p.id for p in problems}) == len(problems)
    for p in problems:
        assert is_equivalent(p.answer, p.answer)
        assert extract_answer(f"so \\boxed{{{p.answer}}}.") == p.answer


@pytest.mark.parametrize("content, message", [
    ('{"problem": "1+1"}\n', "missing field"),
    ('{"problem": "1+1", "answer": 2}\nnot json\n', ":2: not valid JSON"),
    ('{"id": 1, "problem": "a", "answer": 1}\n{"id": 1, "problem": "b", "answer": 2}\n', "duplicate id"),
    ("\n\n", "holds no problems"),
    ('{"problem": "", "answer": 1}\n', "non-empty string"),
    ('{"problem": "1+1", "answer": ""}\n', "'answer' must be a non-empty"),  # no truth: every sample wrong
    ('{"problem": "1+1", "answer": "  "}\n', "'answer' must be a non-empty"),
    ('{"problem": "1+1", "answer": true}\n', "'answer' must be a non-empty"),  # not the string "True"
    ('[1, 2]\n', "JSON object"),
    (b'{"problem": "caf\xe9", "answer": 1}\n', "not UTF-8"),
])
def test_data_errors_are_clear(tmp_path: Path, content: str | bytes, message: str) -> None:
    f = tmp_path / "d.jsonl"
    f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
    with pytest.raises(RastError, match=message):
        load_problems(f)


def test_data_defaults_and_limit(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"problem": f"p{i}", "answer": i}) for i in range(5)) + "\n")
    problems = load_problems(f, limit=3)
    assert [(p.id, p.problem, p.answer) for p in problems] == [("1", "p0", "0"), ("2", "p1", "1"), ("3", "p2", "2")]
    with pytest.raises(RastError, match="does not exist"):
        load_problems(tmp_path / "missing.jsonl")
    for bad in (0, -2):
        with pytest.raises(RastError, match="limit must be >= 1"):
            load_problems(f, limit=bad)
    f.write_text('{"problem": "p", "answer": 0.00001}\n')
    assert is_equivalent("0.00001", load_problems(f)[0].answer)  # str(float) would give 1e-05, which never matches
    f.write_text(json.dumps({"problem": "a\u2028b", "answer": 1}, ensure_ascii=False) + "\n")  # one line
    assert [p.problem for p in load_problems(f)] == ["a\u2028b"]
