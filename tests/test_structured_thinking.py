"""Structured outputs after the thinking (engine/structured_thinking.py, an engine with a reasoning parser).

Oracles, all exact: up to and including the first ``</think>`` nothing is masked, so the tokens equal the
same seeded request's without the constraint (the sampler's draws depend only on seed, position and the
row's distribution); after it the text matches the constraint (checked without xgrammar); where no
thinking opens (qwen3 without <think>) the tokens equal an engine's without a reasoning parser. Speculative
rounds walk the same matcher, so their tokens equal plain decoding's (the coupled method)."""
from __future__ import annotations

import re

import pytest
from logit_adjust_util import make_engine, run

from factories import make_triple
from rast_engine import EngineConfig, SamplingParams
from rast_engine.errors import RastError

pytest.importorskip("xgrammar")

REGEX = "(cat|dog)s? [0-9]{2}"
PROMPT = [5, 9, 9, 17, 4, 9]


@pytest.fixture(scope="module")
def think_triple(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    return make_triple(tmp_path_factory.mktemp("think-tags"), added_tokens=("<think>", "</think>"))


def _tags(engine: object) -> tuple[int, int]:
    tok = engine.tokenizer  # type: ignore[attr-defined]
    (open_id,), (close_id,) = (tok.encode(t, add_special_tokens=False) for t in ("<think>", "</think>"))
    return open_id, close_id


def _params(seed: int, **kw: object) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "seed": seed, "max_tokens": 40, **kw})


def test_the_constraint_holds_the_answer_after_the_thinking(think_triple: tuple) -> None:
    engine = make_engine(think_triple, reasoning_parser="deepseek_r1")
    open_id, close_id = _tags(engine)
    bias = {close_id: 3.0}  # so the thinking ends within max_tokens
    free = run(engine, {f"f{s}": (PROMPT, _params(s, logit_bias=bias)) for s in range(6)})
    held = run(engine, {f"h{s}": (PROMPT, _params(s, logit_bias=bias, structured_outputs={"regex": REGEX}))
                        for s in range(6)})
    ended = 0
    for s in range(6):
        a, b = free[f"f{s}"][0].token_ids, held[f"h{s}"][0]
        if close_id not in a:
            continue
        k = a.index(close_id)
        assert b.token_ids[:k + 1] == a[:k + 1], s  # the thinking, unmasked
        answer = engine.tokenizer.decode(b.token_ids[k + 1:], skip_special_tokens=True)
        assert b.finish_reason == "stop" and re.fullmatch(REGEX, answer), (s, answer)
        ended += k > 0
    assert ended >= 3, "setup: too few thoughts ended within max_tokens"


def test_qwen3_holds_an_output_that_does_not_open_thinking_from_its_first_token(think_triple: tuple) -> None:
    engine = make_engine(think_triple, reasoning_parser="qwen3")
    plain = make_engine(think_triple)
    open_id, close_id = _tags(engine)
    held = {"regex": REGEX}
    # <think> banned: the grammar from the first token, as an engine without a reasoning parser
    ban = {f"b{s}": (PROMPT, _params(s, bad_words=["<think>"], structured_outputs=held)) for s in range(4)}
    want = {k: v[0].token_ids for k, v in run(plain, ban).items()}
    assert {k: v[0].token_ids for k, v in run(engine, ban).items()} == want
    # <think> made likely: the first draw may take it (the grammar could not); where it does, and the
    # unconstrained run's does too, the rest of the thinking is unmasked: the same tokens
    lure = {open_id: 6.0, close_id: 4.0}
    got = run(engine, {f"o{s}": (PROMPT, _params(s, logit_bias=lure, structured_outputs=held)) for s in range(16)})
    free = run(engine, {f"o{s}": (PROMPT, _params(s, logit_bias=lure)) for s in range(16)})
    compared = 0
    for rid, out in got.items():
        ids, a = out[0].token_ids, free[rid][0].token_ids
        assert ids[0] == open_id or re.match("c|d", engine.tokenizer.decode(ids[:1])), rid  # <think> or the grammar's
        if ids[0] == a[0] == open_id and close_id in a[2:]:
            k = a.index(close_id, 1)
            assert ids[:k + 1] == a[:k + 1], rid
            compared += 1
    assert compared >= 3, "setup: too few thoughts opened and ended"
    # a prompt ending inside an open <think> starts in the thinking: no mask before </think>
    open_prompt = PROMPT + [open_id]
    a = run(engine, {"x": (open_prompt, _params(1, logit_bias={close_id: 3.0}))})["x"][0].token_ids
    b = run(engine, {"x": (open_prompt, _params(1, logit_bias={close_id: 3.0}, structured_outputs=held))})["x"][0]
    k = a.index(close_id)
    assert b.token_ids[:k + 1] == a[:k + 1] and k > 0
    # a prompt that closes the thinking (Qwen3's enable_thinking false): held from the first token, under
    # either parser, as by an engine without one
    closed = PROMPT + [open_id, close_id]
    want = run(plain, {"c": (closed, _params(2, structured_outputs=held))})["c"][0].token_ids
    for parser_engine in (engine, make_engine(think_triple, reasoning_parser="deepseek_r1")):
        assert run(parser_engine, {"c": (closed, _params(2, structured_outputs=held))})["c"][0].token_ids == want


def test_speculative_rounds_walk_the_thinking_as_plain_decoding(think_triple: tuple) -> None:
    close_id = _tags(make_engine(think_triple))[1]
    requests = {f"s{s}": (PROMPT, _params(s, logit_bias={close_id: 3.0}, structured_outputs={"regex": REGEX}))
                for s in range(3)}
    requests["g"] = ([7, 30, 4, 9], SamplingParams(temperature=0.0, max_tokens=30, logit_bias={close_id: 4.0},
                                                   structured_outputs={"choice": ["the cat", "a dog"]}))
    want = {k: v[0].token_ids for k, v in run(make_engine(think_triple, reasoning_parser="deepseek_r1",
                                                          max_model_len=128, kv_cache_blocks=256), requests).items()}
    assert any(close_id in ids[1:] for ids in want.values()), "setup: no thinking ended"
    engine = make_engine(think_triple, reasoning_parser="deepseek_r1", max_model_len=128, kv_cache_blocks=256,
                         speculative_tokens=3)
    assert {k: v[0].token_ids for k, v in run(engine, requests).items()} == want
    assert engine.stats().spec_accepted_tokens_total > 0


def test_split_tags_refuse_structured_requests_only(server_triple: tuple) -> None:
    engine = make_engine(server_triple, reasoning_parser="qwen3")  # its tokenizer has no <think> token
    with pytest.raises(RastError, match="single tokens of the vocabulary"):
        engine.add_request("x", PROMPT, _params(0, structured_outputs={"regex": REGEX}))
    assert run(engine, {"y": (PROMPT, _params(0, max_tokens=3))})["y"][0].token_ids
    with pytest.raises(RastError, match="reasoning_parser must be one of deepseek_r1, qwen3"):
        EngineConfig("m", reasoning_parser="r1")
