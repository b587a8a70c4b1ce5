"""Length limits and stop conditions (a stop string across a token boundary, EOS and stop_token_ids with
ignore_eos) against the same engine unconstrained, as in test_engine_lifecycle.py; each test also checks
that the engine ends clean."""
from __future__ import annotations

import pytest

from rast_engine import LLMEngine, SamplingParams
from rast_engine.errors import RastError
from test_engine_lifecycle import TEXTS, alone, assert_clean, encode, make_engine, run, summary


@pytest.fixture(scope="module")
def oracle(qwen2_triple: tuple) -> LLMEngine:
    return make_engine(qwen2_triple, blocks=256, caching=False)


def test_length_limits(qwen2_triple: tuple, oracle: LLMEngine) -> None:
    engine = make_engine(qwen2_triple, blocks=32, max_model_len=24)
    ids = encode(engine, TEXTS[0])
    room = 24 - len(ids)
    with pytest.raises(RastError, match="max_model_len"):
        engine.add_request("full", [5] * 24, SamplingParams(max_tokens=1))  # exactly at the limit: no room
    assert_clean(engine)
    greedy = dict(temperature=0.0, ignore_eos=True)
    long = alone(oracle, ids, SamplingParams(n=2, max_tokens=room, **greedy))
    got = run(engine, {
        "over": (ids, SamplingParams(n=2, max_tokens=room + 20, **greedy)),  # prompt + max_tokens > limit
        "one": (ids, SamplingParams(n=2, max_tokens=1, **greedy)),
        "edge": ([5] * 23, SamplingParams(max_tokens=5, **greedy)),  # one token of room
        "none": (ids, SamplingParams(max_tokens=None, **greedy)),  # vLLM's: up to the end of the context
    })
    assert got["over"] == long and all(r == "length" for _, _, r in got["over"])
    assert got["none"] == long[:1]
    with pytest.raises(RastError, match="leaves room for") as info:
        engine.add_request("many", ids, SamplingParams(max_tokens=None, min_tokens=room + 1))
    assert info.value.param == "min_tokens"
    assert [t for t, _, _ in got["one"]] == [long[0][0][:1]] * 2 and got["one"][0][2] == "length"
    assert len(got["edge"][0][0]) == 1 and got["edge"][0][2] == "length"
    assert_clean(engine)


def _boundary_stop(engine: LLMEngine, tokens: list[int], text: str) -> tuple[str, int]:
    """A 4-character stop string first found across a token boundary; the tokens up to its last one."""
    ends = [len(engine.tokenizer.decode(tokens[:k + 1], skip_special_tokens=True)) for k in range(len(tokens))]
    for k in range(len(tokens) - 1):
        b = ends[k]
        if ends[k] - (ends[k - 1] if k else 0) >= 2 and ends[k + 1] - b >= 2:
            stop = text[b - 2:b + 2]
            if text.find(stop) == b - 2 and stop.strip():
                return stop, k + 2
    raise AssertionError("no token boundary with a usable stop string")


def test_stop_string_spanning_tokens(qwen2_triple: tuple, oracle: LLMEngine) -> None:
    engine = make_engine(qwen2_triple, blocks=64)
    ids = encode(engine, TEXTS[3])
    base = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    [(tokens, text, _)] = alone(oracle, ids, base)
    stop, upto = _boundary_stop(engine, tokens, text)
    params = SamplingParams(n=2, temperature=0.0, max_tokens=16, ignore_eos=True, stop=["zzzzzz", stop])
    engine.add_request("s", ids, params)
    streamed = []
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            streamed.append(out.outputs[0].text)
            final = out
    assert summary(final) == [(tokens[:upto], text[:text.find(stop)], "stop")] * 2
    assert all(stop not in s and final.outputs[0].text.startswith(s) for s in streamed)
    kept = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=["zzzzzz", stop],
                          include_stop_str_in_output=True, output_kind="delta")
    engine.add_request("kept", ids, kept)
    pieces = [o.outputs[0].text for _ in range(40) if engine.has_unfinished_requests()
              for o in engine.step() if o.outputs]
    assert "".join(pieces) == text[:text.find(stop) + len(stop)]
    assert_clean(engine)


def test_eos_first_token_and_stop_token_ids_with_ignore_eos(qwen2_triple: tuple, oracle: LLMEngine) -> None:
    engine = make_engine(qwen2_triple, blocks=64)
    ids = encode(engine, TEXTS[2])
    [(tokens, _, _)] = alone(oracle, ids, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    # the tiny random model never picks </s> by itself: declare its first greedy token the eos token
    engine.scheduler.stops.eos_token_ids = frozenset({tokens[0]})
    got = run(engine, {
        "eos": (ids, SamplingParams(n=2, temperature=0.0, max_tokens=8)),
        "ignored": (ids, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)),
        "stop_id": (ids, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, stop_token_ids=[tokens[3]])),
        "eos_id": (ids, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, stop_token_ids=[tokens[0]])),
    })
    assert [(t, r) for t, _, r in got["eos"]] == [([tokens[0]], "stop")] * 2
    assert got["ignored"][0][0] == tokens and got["ignored"][0][2] == "length"
    k = tokens.index(tokens[3])
    assert got["stop_id"][0][0] == tokens[:k + 1] and got["stop_id"][0][2] == "stop"
    assert got["eos_id"][0][0] == tokens[:1] and got["eos_id"][0][2] == "stop"
    assert_clean(engine)


def _decode(engine: LLMEngine, tokens: list[int], skip: bool = True) -> str:
    return engine.tokenizer.decode(tokens, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def test_stop_token_text_is_left_out_unless_included(qwen2_triple: tuple, oracle: LLMEngine) -> None:
    """vLLM's rule: a stop_token_ids id, or EOS shown by skip_special_tokens=False, ends the token ids but
    adds no text unless include_stop_str_in_output."""
    engine = make_engine(qwen2_triple, blocks=64)
    ids = encode(engine, TEXTS[2])
    greedy = dict(temperature=0.0, max_tokens=8)
    [(tokens, _, _)] = alone(oracle, ids, SamplingParams(ignore_eos=True, **greedy))
    k = next(k for k in range(1, 8) if _decode(engine, tokens[k:k + 1]).strip() and tokens[k] not in tokens[:k])
    got = run(engine, {
        "hidden": (ids, SamplingParams(ignore_eos=True, stop_token_ids=[tokens[k]], **greedy)),
        "shown": (ids, SamplingParams(ignore_eos=True, stop_token_ids=[tokens[k]], include_stop_str_in_output=True,
                                      **greedy)),
    })
    assert got["hidden"] == [(tokens[:k + 1], _decode(engine, tokens[:k]), "stop")]
    assert got["shown"] == [(tokens[:k + 1], _decode(engine, tokens[:k + 1]), "stop")]
    engine.scheduler.stops.eos_token_ids = frozenset({tokens[k]})
    got = run(engine, {"eos": (ids, SamplingParams(skip_special_tokens=False, **greedy))})
    assert got["eos"] == [(tokens[:k + 1], _decode(engine, tokens[:k], skip=False), "stop")]
    assert_clean(engine)


def test_stop_reason_names_what_stopped(qwen2_triple: tuple, oracle: LLMEngine) -> None:
    """vLLM's stop_reason: the stop_token_ids id or the matched stop string; None for EOS and length."""
    engine = make_engine(qwen2_triple, blocks=64)
    ids = encode(engine, TEXTS[2])
    greedy = dict(temperature=0.0, max_tokens=8)
    [(tokens, text, _)] = alone(oracle, ids, SamplingParams(ignore_eos=True, **greedy))
    k = next(k for k in range(1, 8) if tokens[k] not in tokens[:k] and _decode(engine, tokens[k:k + 1]).strip())
    stop = _decode(engine, tokens[k:k + 1]).strip()[0]  # a character of token k's text (maybe found earlier)
    engine.scheduler.stops.eos_token_ids = frozenset({tokens[k]})  # "id" ignores EOS: its id is the stop_token_ids one
    requests = {"id": SamplingParams(ignore_eos=True, stop_token_ids=[tokens[k]], **greedy),
                "length": SamplingParams(ignore_eos=True, **greedy), "eos": SamplingParams(**greedy),
                "string": SamplingParams(ignore_eos=True, stop=["zz" * 8, stop], **greedy)}
    for rid, params in requests.items():
        engine.add_request(rid, ids, params)
    reasons = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                reasons[out.request_id] = (out.outputs[0].finish_reason, out.outputs[0].stop_reason)
    want = {"id": ("stop", tokens[k]), "length": ("length", None), "string": ("stop", stop), "eos": ("stop", None)}
    assert reasons == {rid: want[rid] for rid in requests}
    assert_clean(engine)


def test_min_tokens_hides_every_stop_string_in_its_text(qwen2_triple: tuple, oracle: LLMEngine) -> None:
    """Stop strings match only text that ends after the first min_tokens tokens, whatever their lengths: a
    one-character stop string inside that text must not match once a longer stop string widens the search."""
    engine = make_engine(qwen2_triple, blocks=64)
    ids = encode(engine, TEXTS[3])
    n = 12
    [(tokens, _, _)] = alone(oracle, ids, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    texts = [_decode(engine, tokens[:j]) for j in range(n + 1)]

    def expected(stops: list[str], m: int) -> tuple[list[int], str, str]:
        for j in range(m + 1, n + 1):  # matches ending in the j-th token's new text, checked from m + 1 on
            at = [i for s in stops if (i := texts[j].find(s, max(len(texts[j - 1]) - len(s) + 1, 0))) >= 0]
            if at:
                return tokens[:j], texts[j][:min(at)], "stop"
        return tokens, texts[n], "length"

    cases = [(m, [texts[m][-1], "Q" * 10]) for m in range(2, n - 2) if texts[m][-1:].strip()]
    m, stops = next((m, s) for m, s in cases if len(expected(s, m)[0]) != m + 1)  # the old rule stopped at m + 1
    got = run(engine, {"m": (ids, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, min_tokens=m,
                                                 stop=stops))})
    assert got["m"] == [expected(stops, m)]
    assert_clean(engine)


def test_min_tokens_masks_eos_with_ignore_eos_too(qwen2_triple: tuple) -> None:
    """As vLLM's MinTokens processor: EOS is masked until min_tokens whether or not it ends the request."""
    engine = make_engine(qwen2_triple)
    eos = sorted(engine.scheduler.stops.eos_token_ids)
    ids = encode(engine, TEXTS[0])
    pushed = dict(temperature=0.0, ignore_eos=True, logit_bias={t: 100.0 for t in eos}, max_tokens=6)
    got = run(engine, {"min": (ids, SamplingParams(min_tokens=4, **pushed)), "free": (ids, SamplingParams(**pushed))})
    assert all(t in eos for t in got["free"][0][0])  # the bias makes EOS the argmax at every draw
    tokens = got["min"][0][0]
    assert len(tokens) == 6 and not set(tokens[:4]) & set(eos) and all(t in eos for t in tokens[4:])
    assert_clean(engine)
