"""engine/server/prompt_encoding.py: a text far longer than the context is refused from a prefix cut at a
whitespace after a letter or digit. The refusal is sound only if that prefix's tokens are a prefix of the
whole text's (so the text holds at least as many): checked here against the tokenizers themselves (a
GPT-2-style byte-level BPE, and the Qwen2 tokenizer transformers builds for the test models, with its
regex and NFC), on random texts of words, digits, punctuation, spaces, newlines and letters NFC
decomposes, at every cut the rule allows."""
from __future__ import annotations

import functools
import random

import pytest
from transformers import AutoTokenizer

from factories import make_tokenizer
from rast_engine.errors import RastError
from rast_engine.server.prompt_encoding import (CHARS_PER_CONTEXT_TOKEN, _REGEXES, _whitespace_cut, encode_prompt,
                                                prefix_refusal_sound)

PIECES = ["the", "cat", "Sat", "on", "'s", "'ll", "don't", "42", "1234567", "x9", "!", "?!", "...", ",", "é",
          "e\u0301", "中文", "😀", "²", "½", "Ⅻ", "\u0660", "\u0958", "\ufb2a", "\u093c", " ", "  ", "\n", "\n\n",
          " \n", "\r\n", "\t", "\u00a0", "\u3000", ".\n", "!\n\n", "—"]


def random_text(rng: random.Random, pieces: int) -> str:
    return "".join(rng.choice(PIECES) + rng.choice(["", " ", "\n"]) for _ in range(pieces))


def regex_bpe(regex: str, nfc: bool, corpus: list[str]) -> object:
    """A BPE tokenizer pre-tokenised as Qwen2's or Llama 3's (their regex, then byte-level), trained here
    on ``corpus`` so that it merges across what the regex joins (a combining mark and a newline)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=3000, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path_factory.mktemp("tok"))))


def test_the_argument_is_checked_for_these_tokenizers_only(tok, qwen2_triple: tuple) -> None:  # noqa: ANN001
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert PRETOKENIZE_REGEX == _REGEXES[0]  # the allow-list follows transformers' Qwen2 tokenizer
    assert prefix_refusal_sound(tok) and prefix_refusal_sound(AutoTokenizer.from_pretrained(str(qwen2_triple[0])))
    assert not prefix_refusal_sound(None) and not prefix_refusal_sound(object())


@pytest.mark.parametrize("which", ["gpt2 byte-level", "qwen2 + NFC", "llama3"])
def test_a_cut_prefix_tokenises_as_a_prefix_of_the_whole(tok, which: str) -> None:  # noqa: ANN001
    rng = random.Random(0)
    if which == "gpt2 byte-level":
        encode = functools.partial(tok.encode, add_special_tokens=False)
    else:
        trained = regex_bpe(_REGEXES[which == "llama3"], which.endswith("NFC"),
                            [random_text(rng, rng.randint(5, 60)) for _ in range(2000)])
        encode = lambda text: trained.encode(text, add_special_tokens=False).ids  # noqa: E731
    cuts = 0
    for _ in range(300):
        text = random_text(rng, rng.randint(3, 40))
        whole = encode(text)
        for cut in sorted({_whitespace_cut(text, limit) for limit in range(1, len(text))} - {0}):
            cuts += 1
            assert text[cut].isspace() and text[cut - 1].isalnum()
            part = encode(text[:cut])
            assert whole[:len(part)] == part, (ascii(text), cut)
    assert cuts > 1000


def test_text_far_past_the_context_is_refused_from_a_prefix(tok) -> None:  # noqa: ANN001
    text = "the cat sat on the mat " * 400
    seen: list[int] = []

    class Counting:
        def encode(self, s: str, **kw: object) -> list[int]:
            seen.append(len(s))
            return tok.encode(s, **kw)

    with pytest.raises(RastError, match="more than 64 tokens"):
        encode_prompt(Counting(), text, True, 64, refuse_from_prefix=True)
    assert seen and max(seen) <= CHARS_PER_CONTEXT_TOKEN * 64  # never the whole text
    seen.clear()  # truncate_prompt_tokens keeps the prompt's end: it is encoded whole
    assert encode_prompt(Counting(), text, True, 64, refuse_from_prefix=False) == tok.encode(text) and seen == [len(text)]
    seen.clear()  # a text with long tokens passes the prefix check: it is encoded whole, and fits
    runs = "=" * (CHARS_PER_CONTEXT_TOKEN * 64 + 10)
    assert encode_prompt(Counting(), runs, False, 64, refuse_from_prefix=True) == tok.encode(runs, add_special_tokens=False)
