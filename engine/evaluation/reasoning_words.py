"""The paper's curated reasoning words (Fig. 9) and their per-trajectory frequencies (App. C.3).

A word counts when it appears as a whole word, case-insensitively ("back" does not count inside
"backtrack", "try" does not count inside "retry"); the paper lists words, not morphological families."""
from __future__ import annotations

import re
from collections.abc import Iterable

REASONING_WORDS: dict[str, tuple[str, ...]] = {
    "branching_out": (
        "alternatively", "another", "try", "suppose", "consider", "different", "assume", "also", "option",
    ),
    "backtracking": (
        "however", "but", "mistake", "error", "contradiction", "wrong", "revisit", "actually", "again",
        "flawed",
    ),
    "self_verification": (
        "check", "verify", "confirm", "satisfy", "plug", "back", "substitute", "ensure", "validate", "test",
    ),
}

_WORD_RE = re.compile(r"[a-z]+")


def count_words(text: str) -> dict[str, dict[str, int]]:
    """Occurrences of every listed word in one trajectory, grouped by behaviour."""
    tally: dict[str, int] = {}
    for word in _WORD_RE.findall(text.lower()):
        tally[word] = tally.get(word, 0) + 1
    return {cat: {w: tally.get(w, 0) for w in words} for cat, words in REASONING_WORDS.items()}


def word_frequencies(texts: Iterable[str]) -> dict[str, dict]:
    """Mean occurrences per trajectory, per behaviour (`per_trajectory`) and per word (`words`)."""
    totals = {cat: {w: 0 for w in words} for cat, words in REASONING_WORDS.items()}
    num = 0
    for text in texts:
        num += 1
        for cat, counts in count_words(text).items():
            for w, c in counts.items():
                totals[cat][w] += c
    denom = max(num, 1)
    return {
        cat: {
            "per_trajectory": sum(words.values()) / denom,
            "words": {w: c / denom for w, c in words.items()},
        }
        for cat, words in totals.items()
    }
