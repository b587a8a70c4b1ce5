"""Incremental detokenisation against the independent oracle, a full tokenizer.decode of the output ids:
the streamed (tokenizers' DecodeStream) and the windowed paths, one token or several per step, on text
with multi-byte characters and on random ids that split them."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from factories import make_tokenizer
from rast_engine.detokenizer import IncrementalDetokenizer

TEXTS = ["the cat sat on the mat", " héllo wörld, naïve café", "数学 3 + 5 = 8 🎉 done", "  spaces\tand\nlines  "]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return AutoTokenizer.from_pretrained(str(make_tokenizer(Path(tmp_path_factory.mktemp("tok")))))


def incremental(tokenizer, prompt: list[int], output: list[int], stream: bool, rng: random.Random,  # noqa: ANN001
                skip_special_tokens: bool = True) -> str:
    detok = IncrementalDetokenizer(tokenizer, prompt, stream=stream, skip_special_tokens=skip_special_tokens)
    ids, text, i = list(prompt), "", 0
    while i < len(output):
        k = rng.choice([1, 1, 1, 2, 3])  # several tokens in one step too (a step after a stall)
        ids += output[i:i + k]
        i += k
        text += detok.step(ids + [-1], len(ids)) if rng.random() < 0.3 else detok.step(ids)  # a pending tail
    return text


@pytest.mark.parametrize("stream", [True, False])
def test_incremental_text_equals_a_full_decode(tokenizer, stream: bool) -> None:  # noqa: ANN001
    rng = random.Random(stream)
    assert (IncrementalDetokenizer(tokenizer, [1, 2])._stream is not None) is True  # a fast tokenizer streams
    for prompt_text in TEXTS:
        prompt = tokenizer.encode(prompt_text)
        for out_text in TEXTS:
            output = tokenizer.encode(out_text)
            want = tokenizer.decode(output, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            assert incremental(tokenizer, prompt, output, stream, rng) == want, (prompt_text, out_text)
    vocab = len(tokenizer)
    for _ in range(40):  # random ids: byte tokens that split and break characters
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 8))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        want = tokenizer.decode(output, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        got = incremental(tokenizer, prompt, output, stream, rng)
        # text is held back only while it ends in an incomplete character
        assert got == want or (want.endswith("\ufffd") and want.startswith(got)), (prompt, output)


@pytest.mark.parametrize("stream", [True, False])
def test_special_tokens_are_shown_when_asked(tokenizer, stream: bool) -> None:  # noqa: ANN001
    rng = random.Random(3)
    special = [tokenizer.eos_token_id, tokenizer.bos_token_id]
    for out_text in TEXTS:
        output = tokenizer.encode(out_text)
        output = output[:2] + special + output[2:] + [special[0]]
        for skip in (True, False):
            want = tokenizer.decode(output, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            assert incremental(tokenizer, tokenizer.encode("a prompt"), output, stream, rng, skip) == want, out_text
        assert tokenizer.eos_token in want  # skip_special_tokens=False shows it
