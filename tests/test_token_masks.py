"""allowed_token_ids and bad_words (vLLM's token masks) against an independent oracle: HF transformers'
forwards give Eq. 3's combined logits, the tokens outside allowed_token_ids are masked by hand, and HF's
NoBadWordsLogitsProcessor masks the bad words' token sequences over the output (vLLM matches bad words
against the output only). The bad words' token sequences are spelled here from the tokenizer by vLLM's
rule, independently of the engine's intake."""
from __future__ import annotations

import pytest
import torch
from logit_adjust_util import PROMPTS, make_engine, oracle_greedy, oracle_logits, record_launches, run

from rast_engine import SamplingParams
from rast_engine.errors import RastError
from rast_engine.bad_words import tokenize_bad_words
from rast_engine.sampling_params import MAX_BAD_WORDS

GREEDY = dict(temperature=0.0, max_tokens=12, ignore_eos=True)


def spellings(tokenizer: object, word: str) -> list[list[int]]:
    """vLLM's token sequences of a bad word: as it starts a text, and after a space when that spelling
    has as many tokens and another first token."""
    bare = tokenizer.encode(word.lstrip(), add_special_tokens=False)
    spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
    return [bare] + ([spaced] if len(spaced) == len(bare) and spaced[0] != bare[0] else [])


def word_in(tokenizer: object, output: list[int], length: int) -> str:
    """A text whose spelling as a bad word is a run of ``length`` tokens of ``output`` (so banning it
    must change that output)."""
    for i in range(len(output) - length + 1):
        span = output[i:i + length]
        text = tokenizer.decode(span)
        if text.strip() and span in spellings(tokenizer, text):
            return text
    pytest.skip(f"no run of {length} tokens in {output} spells a bad word")


def test_allowed_token_ids_equal_the_oracle(qwen2_triple: tuple) -> None:
    engine = make_engine(qwen2_triple)
    vocab = engine.vocab_size
    plain = run(engine, {"p": (PROMPTS[0], SamplingParams(**GREEDY))})["p"][0].token_ids
    allowed = sorted(set(range(3, 60, 2)) - {plain[0]})  # the greedy first token is not allowed
    params = SamplingParams(**GREEDY, allowed_token_ids=allowed)
    outs = run(engine, {"a": (PROMPTS[0], params), "plain": (PROMPTS[1], SamplingParams(**GREEDY))})
    assert outs["a"][0].token_ids == oracle_greedy(qwen2_triple, PROMPTS[0], vocab, params)[0]
    assert set(outs["a"][0].token_ids) <= set(allowed)
    alone = run(make_engine(qwen2_triple), {"plain": (PROMPTS[1], SamplingParams(**GREEDY))})
    assert outs["plain"][0].token_ids == alone["plain"][0].token_ids


def test_sampled_logprobs_are_those_of_the_masked_distribution(qwen2_triple: tuple) -> None:
    """n = 2 at T = 0.9 with both masks: every token is allowed, and its logprob is the oracle's
    log_softmax(z / T) over the masked logits at that step."""
    engine = make_engine(qwen2_triple)
    allowed = list(range(10, 90))
    words = ["the", "cat sat"]
    bad = [s for w in words for s in spellings(engine.tokenizer, w)]
    params = SamplingParams(n=2, temperature=0.9, max_tokens=10, seed=11, logprobs=0, ignore_eos=True,
                            allowed_token_ids=allowed, bad_words=words)
    for sample in run(engine, {"r": (PROMPTS[1], params)})["r"]:
        ids = list(PROMPTS[1])
        for token, entry in zip(sample.token_ids, sample.logprobs):
            z = oracle_logits(qwen2_triple, ids, len(PROMPTS[1]), engine.vocab_size, params, bad)
            assert token in allowed and torch.isfinite(z[token])
            want = torch.log_softmax(z.double() / params.temperature, dim=0)[token].item()
            assert entry[token] == pytest.approx(want, abs=2e-4)
            ids.append(token)


@pytest.mark.parametrize("length", [1, 2])
def test_bad_words_equal_the_oracle(qwen2_triple: tuple, length: int) -> None:
    """A bad word spelled by `length` tokens of the plain greedy output: the output changes, never holds
    the word's tokens in a row, and equals the oracle's."""
    engine = make_engine(qwen2_triple)
    tok = engine.tokenizer
    plain = run(engine, {"p": (PROMPTS[0], SamplingParams(**GREEDY))})["p"][0].token_ids
    word = word_in(tok, plain, length)
    params = SamplingParams(**GREEDY, bad_words=[word])
    bad = spellings(tok, word)
    got = run(engine, {"b": (PROMPTS[0], params)})["b"][0].token_ids
    assert got == oracle_greedy(qwen2_triple, PROMPTS[0], engine.vocab_size, params, bad)[0]
    assert got != plain
    assert not any(got[i:i + len(w)] == w for w in bad for i in range(len(got)))


@pytest.mark.parametrize("length", [2, 3])
def test_bad_words_of_several_tokens_are_launched_ahead(qwen2_triple: tuple, length: int) -> None:
    """A step launched ahead draws after a pending token, whose id only the device has: a bad word whose
    earlier tokens end the known output is banned there iff that token is its second-to-last. So async
    scheduling launches every step, and the tokens equal the oracle's (greedy, a word taken from the plain
    output, so the ban fires) and the synchronous engine's (sampled, with one-token words and a mask)."""
    tok = make_engine(qwen2_triple).tokenizer
    plain = run(make_engine(qwen2_triple), {"p": (PROMPTS[0], SamplingParams(**GREEDY))})["p"][0].token_ids
    word = word_in(tok, plain, length)
    greedy = SamplingParams(**GREEDY, bad_words=[word])
    sampled = SamplingParams(temperature=1.0, max_tokens=10, seed=4, ignore_eos=True, allowed_token_ids=list(range(5, 100)),
                             bad_words=[word, "the", "cat sat"])
    requests = {"g": (PROMPTS[0], greedy), **{f"s{i}": ([7 + i, 9, 9, 30 + i, 4], sampled) for i in range(3)}}
    want = run(make_engine(qwen2_triple), requests)
    engine = make_engine(qwen2_triple, async_output=True, async_scheduling=True)
    launched = record_launches(engine)
    got = run(engine, requests)
    assert {k: v[0].token_ids for k, v in got.items()} == {k: v[0].token_ids for k, v in want.items()}
    assert len(launched) > 1 and all(launched[:-1])  # the last found nothing to launch
    assert got["g"][0].token_ids == oracle_greedy(qwen2_triple, PROMPTS[0], engine.vocab_size, greedy,
                                                  spellings(tok, word))[0] != plain


def test_masks_are_checked(qwen2_triple: tuple) -> None:
    for kw, match in ((dict(allowed_token_ids=[]), "allowed_token_ids"), (dict(allowed_token_ids=[-1]), "allowed"),
                      (dict(allowed_token_ids=[1.0]), "allowed"), (dict(allowed_token_ids=5), "allowed"),
                      (dict(bad_words="the"), "bad_words"), (dict(bad_words=[" "]), "bad_words"),
                      (dict(bad_words=[3]), "bad_words"), (dict(bad_words=["w"] * (MAX_BAD_WORDS + 1)), "at most")):
        with pytest.raises(RastError, match=match):
            SamplingParams(**kw)
    assert SamplingParams(allowed_token_ids=[4, 3, 4]).allowed_token_ids == [4, 3]
    assert SamplingParams(bad_words=["x"]).adjusts_logits and not SamplingParams(bad_words=[]).adjusts_logits
    # whose own masks may leave a draw no token (a NoAdmissibleToken of theirs is a 400, not a 500)
    assert SamplingParams(min_tokens=2, max_tokens=4).masks_tokens
    assert SamplingParams(min_tokens=2, max_tokens=4, ignore_eos=True).masks_tokens  # EOS, as vLLM
    assert not SamplingParams(max_tokens=4, ignore_eos=True, stop_token_ids=[3]).masks_tokens
    engine = make_engine(qwen2_triple)
    with pytest.raises(RastError, match="allowed_token_ids names token ids"):
        engine.add_request("x", PROMPTS[0], SamplingParams(allowed_token_ids=[1, engine.vocab_size]))
    with pytest.raises(RastError, match="at most 1024"):
        engine.add_request("x", PROMPTS[0], SamplingParams(bad_words=["answer " * 60] * 4))
    with pytest.raises(RastError, match="tokenizer"):
        tokenize_bad_words(None, ["x"], engine.vocab_size)
    with pytest.raises(RastError, match="cannot encode bad word") as info:  # a lone surrogate: a 400, not a 500
        engine.add_request("x", PROMPTS[0], SamplingParams(bad_words=["\ud800"]))
    assert info.value.param == "bad_words"
    with pytest.raises(RastError, match="outside the vocabulary"):
        tokenize_bad_words(engine.tokenizer, ["the"], 10)
    eos = sorted(engine.scheduler.stops.eos_token_ids)
    word = word_in(engine.tokenizer, list(range(8, 100)), 1)  # past the special tokens
    the = [w[0] for w in spellings(engine.tokenizer, word)]  # bad_words=[word] masks these at every draw
    for kw in (dict(allowed_token_ids=the, bad_words=[word]), dict(allowed_token_ids=eos + [7], stop_token_ids=[7],
                                                                       min_tokens=1, max_tokens=4),
               dict(allowed_token_ids=eos, min_tokens=1, max_tokens=4, ignore_eos=True)):
        with pytest.raises(RastError, match="allowed_token_ids leaves no token") as info:  # a 400, not a 500 later
            engine.add_request("x", PROMPTS[0], SamplingParams(**kw))
        assert info.value.param == "allowed_token_ids"
    for kw in (dict(allowed_token_ids=eos + [7], stop_token_ids=[7], max_tokens=4),  # no min_tokens
               dict(allowed_token_ids=the + [next(i for i in range(9, 99) if i not in the)], bad_words=[word])):
        engine.add_request("ok", PROMPTS[0], SamplingParams(**kw))
        engine.abort_request("ok")
    assert not engine.groups
