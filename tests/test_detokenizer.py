"""Incremental detokenisation against the independent oracle, a full tokenizer.decode of the output ids:
the streamed (tokenizers' DecodeStream) and the windowed paths, one token or several per step, on text
with multi-byte characters and on random ids that split them; text held at the end is flushed."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from factories import make_tokenizer
from rast_engine.detokenizer import IncrementalDetokenizer

TEXTS = ["the cat sat on the mat", " héllo wörld, naïve café", "数学 3 + 5 = 8 🎉 done", "  spaces\tand\nlines  "]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    # trained on TEXTS too, so their multi-byte characters are spelled in byte tokens, not dropped
    return AutoTokenizer.from_pretrained(str(make_tokenizer(Path(tmp_path_factory.mktemp("tok")), tuple(TEXTS))))


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style (Llama 2): <0xNN> byte pieces and a ByteFallback decoder, which renders every
    byte of an invalid UTF-8 group as U+FFFD, including bytes that formed a character before."""
    words = ["▁", "t", "h", "e", "▁t", "▁th", "▁the"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    vocab.update({w: 259 + i for i, w in enumerate(words)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "t"), ("▁t", "h"), ("▁th", "e")], byte_fallback=True,
                               unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def incremental(tokenizer, prompt: list[int], output: list[int], stream: bool, rng: random.Random,  # noqa: ANN001
                skip_special_tokens: bool = True) -> str:
    """The text a finished sequence gets: the steps' text, then what the detokenizer still held."""
    detok = IncrementalDetokenizer(tokenizer, prompt, stream=stream, skip_special_tokens=skip_special_tokens)
    ids, text, i = list(prompt), "", 0
    while i < len(output):
        k = rng.choice([1, 1, 1, 2, 3])  # several tokens in one step too (a step after a stall)
        ids += output[i:i + k]
        i += k
        text += detok.step(ids + [-1], len(ids)) if rng.random() < 0.3 else detok.step(ids)  # a pending tail
    return text + detok.flush(ids)


def decode(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:  # noqa: ANN001
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("stream", [True, False])
def test_incremental_text_equals_a_full_decode(tokenizer, stream: bool) -> None:  # noqa: ANN001
    rng = random.Random(stream)
    assert (IncrementalDetokenizer(tokenizer, [1, 2])._stream is not None) is True  # a fast tokenizer streams
    assert len(tokenizer.encode("数")) == 3  # the fixture spells it in byte tokens
    for prompt_text in TEXTS:
        prompt = tokenizer.encode(prompt_text)
        for out_text in TEXTS:
            output = tokenizer.encode(out_text)
            assert incremental(tokenizer, prompt, output, stream, rng) == decode(tokenizer, output) == out_text
    vocab, tried = len(tokenizer), 0
    while tried < 40:  # random ids: byte tokens that split and break characters, invalid bytes held to the end
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 8))]
        if decode(tokenizer, prompt).endswith("\ufffd"):
            continue  # test_a_prompt_ending_inside_a_character
        tried += 1
        output = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        assert incremental(tokenizer, prompt, output, stream, rng) == decode(tokenizer, output), (prompt, output)


@pytest.mark.parametrize("stream", [True, False])
def test_a_prompt_ending_inside_a_character(tokenizer, stream: bool) -> None:  # noqa: ANN001
    """A continuation cut inside 学 (two of its three byte tokens): output bytes completing it make it the
    output's first character; output that does not leaves the prompt's bytes out (the prompt's text was
    never part of the output, as before the fix, when the stream released the whole prompt)."""
    rng = random.Random(0)
    full = tokenizer.encode("数学 3 + 5")
    prompt, rest = full[:5], full[5:]
    assert decode(tokenizer, prompt).endswith("\ufffd")
    assert incremental(tokenizer, prompt, rest, stream, rng) == "学 3 + 5"
    output = tokenizer.encode(" 3 + 5 done")
    assert incremental(tokenizer, prompt, output, stream, rng) == decode(tokenizer, output) == " 3 + 5 done"


@pytest.mark.parametrize("stream", [True, False])
def test_held_text_is_flushed_at_the_end(tokenizer, stream: bool) -> None:  # noqa: ANN001
    """Lead bytes that never complete are held while the text ends in U+FFFD; the sequence's end releases
    them, so the final text equals the full decode (they were lost before)."""
    lead = tokenizer.encode("数")[0]
    output = tokenizer.encode("the") + [lead] * 3
    prompt = tokenizer.encode("a prompt")
    detok = IncrementalDetokenizer(tokenizer, prompt, stream=stream)
    ids = prompt + output
    assert "".join(detok.step(ids, end) for end in range(len(prompt) + 1, len(ids) + 1)) == "the"
    assert detok.flush(ids) == "\ufffd" * 3 == decode(tokenizer, output)[3:]


@pytest.mark.parametrize("stream", [True, False])
def test_byte_fallback_rewriting_released_text_does_not_raise(stream: bool) -> None:
    """你 as three <0xNN> pieces, then the lead byte of another character, then a word: ByteFallback then
    renders all four bytes as U+FFFD, so released text (你) changes. DecodeStream raises "Invalid prefix"
    there, which took the engine down; the detokenizer goes on in the windowed decode, as vLLM recovers,
    and both paths give the same text: 你 stays, the rest follows the full decode."""
    tok = byte_fallback_tokenizer()
    prompt = tok.encode("the", add_special_tokens=False)
    output = [3 + 0xE4, 3 + 0xBD, 3 + 0xA0, 3 + 0xE5] + tok.encode("the", add_special_tokens=False)
    assert decode(tok, output) == "\ufffd" * 4 + " the"
    detok = IncrementalDetokenizer(tok, prompt, stream=stream)
    assert (detok._stream is not None) is stream
    ids = list(prompt)
    texts = []
    for t in output:
        ids.append(t)
        texts.append(detok.step(ids))
    assert texts[:3] == ["", "", "你"] and "".join(texts) + detok.flush(ids) == "你" + "\ufffd" * 3 + " the"


@pytest.mark.parametrize("stream", [True, False])
def test_special_tokens_are_shown_when_asked(tokenizer, stream: bool) -> None:  # noqa: ANN001
    rng = random.Random(3)
    special = [tokenizer.eos_token_id, tokenizer.bos_token_id]
    for out_text in TEXTS:
        output = tokenizer.encode(out_text)
        output = output[:2] + special + output[2:] + [special[0]]
        for skip in (True, False):
            want = decode(tokenizer, output, skip)
            assert incremental(tokenizer, tokenizer.encode("a prompt"), output, stream, rng, skip) == want, out_text
        assert tokenizer.eos_token in want  # skip_special_tokens=False shows it


@pytest.mark.parametrize("output_kind", ["cumulative", "delta"])
def test_engine_releases_held_text_when_a_sequence_ends(tmp_path: Path, output_kind: str) -> None:
    """End to end: a request that samples only é's lead byte ends by max_tokens with its text still held
    (it ends in U+FFFD); the engine flushes it, so the final text equals the full decode (it was empty)."""
    from factories import make_triple
    from rast_engine import LLM, SamplingParams

    dirs = make_triple(tmp_path / "triple", extra_corpus=("café",))
    llm = LLM(*map(str, dirs), lam=0.5, device="cpu", dtype="float32", kv_cache_blocks=16, enforce_eager=True)
    tok = llm.get_tokenizer()
    lead = tok.encode("é")[0]
    assert decode(tok, [lead]) == "\ufffd"
    engine = llm.llm_engine
    engine.add_request("r", "the cat", SamplingParams(max_tokens=3, temperature=0.0, allowed_token_ids=[lead],
                                                       output_kind=output_kind))
    text, ids = "", []
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0]
            text, ids = (text + c.text, ids + c.token_ids) if output_kind == "delta" else (c.text, c.token_ids)
    assert ids == [lead] * 3 and text == decode(tok, ids) == "\ufffd" * 3
