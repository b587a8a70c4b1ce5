"""engine/server/prompt_encoding.py: a text far longer than the context is refused from a prefix cut at a
whitespace after a letter or digit. The refusal is sound only if that prefix's tokens are a prefix of the
whole text's (so the text holds at least as many): checked here against the tokenizer itself, on random
texts of words, digits, punctuation, spaces and newlines, at every cut the rule allows."""
from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from factories import make_tokenizer
from rast_engine.errors import RastError
from rast_engine.server.prompt_encoding import CHARS_PER_CONTEXT_TOKEN, _whitespace_cut, encode_prompt

PIECES = ["the", "cat", "sat", "on", "mat", "42", "1234567", "x9", "!", "?!", "...", ",", "'s", "é", "中文",
          " ", "  ", "\n", "\n\n", " \n", "\t"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path_factory.mktemp("tok"))))


def test_a_cut_prefix_tokenises_as_a_prefix_of_the_whole(tok) -> None:  # noqa: ANN001
    rng = random.Random(0)
    cuts = 0
    for _ in range(200):
        text = "".join(rng.choice(PIECES) + rng.choice(["", " "]) for _ in range(rng.randint(5, 60)))
        whole = tok.encode(text, add_special_tokens=False)
        for limit in range(1, len(text)):
            cut = _whitespace_cut(text, limit)
            if cut:
                cuts += 1
                assert text[cut].isspace() and text[cut - 1].isalnum() and cut <= limit
                part = tok.encode(text[:cut], add_special_tokens=False)
                assert whole[:len(part)] == part, (text, cut)
    assert cuts > 1000


def test_text_far_past_the_context_is_refused_from_a_prefix(tok) -> None:  # noqa: ANN001
    text = "the cat sat on the mat " * 400
    seen: list[int] = []

    class Counting:
        def encode(self, s: str, **kw: object) -> list[int]:
            seen.append(len(s))
            return tok.encode(s, **kw)

    with pytest.raises(RastError, match="more than 64 tokens"):
        encode_prompt(Counting(), text, True, 64, whole=True)
    assert seen and max(seen) <= CHARS_PER_CONTEXT_TOKEN * 64  # never the whole text
    seen.clear()  # truncate_prompt_tokens keeps the prompt's end: it is encoded whole
    assert encode_prompt(Counting(), text, True, 64, whole=False) == tok.encode(text) and seen == [len(text)]
    seen.clear()  # a text with long tokens passes the prefix check: it is encoded whole, and fits
    runs = "=" * (CHARS_PER_CONTEXT_TOKEN * 64 + 10)
    assert encode_prompt(Counting(), runs, False, 64, whole=True) == tok.encode(runs, add_special_tokens=False)
