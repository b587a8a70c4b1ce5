"""Structured outputs in speculative rounds (engine/speculative/grammar.py): a fork of each request's matcher
walks the drafts, so every position's mask is the one plain decoding uses there. Oracle: plain decoding's
tokens (the coupled method), and the constraint checked without xgrammar for the rejection method."""
from __future__ import annotations

from dataclasses import replace

import pytest
from logit_adjust_util import make_engine, run
from test_structured import CASES, PROMPT, satisfied

from rast_engine import SamplingParams

xgr = pytest.importorskip("xgrammar")


@pytest.mark.parametrize("kind", sorted(CASES))
def test_speculative_rounds_give_structured_outputs_the_plain_tokens(json_triple: tuple, kind: str) -> None:
    """Rounds walk a fork of each structured row's matcher over its drafts, so the coupled method emits
    the plain engine's tokens: sampled and greedy, with a batch-mate, past the grammar's end with
    ignore_eos (stop tokens only), and under preemption. The rejection method keeps every constraint."""
    so = CASES[kind]
    requests = {"s": (PROMPT, SamplingParams(temperature=1.0, seed=3, max_tokens=40, structured_outputs=so)),
                "g": ([7, 30, 4, 9], SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=so)),
                "e": (PROMPT, SamplingParams(temperature=0.7, seed=1, max_tokens=12, ignore_eos=True,
                                             structured_outputs=CASES["choice"])),
                "free": ([7, 30, 4, 9], SamplingParams(temperature=0.9, seed=4, max_tokens=40, ignore_eos=True)),
                "free2": ([9, 9, 30], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))}
    want = {k: v[0].token_ids for k, v in run(make_engine(json_triple, max_model_len=128, kv_cache_blocks=256),
                                              requests).items()}
    eos = make_engine(json_triple).scheduler.stops.eos_token_ids
    assert len(want["e"]) == 12 and want["e"][-1] in eos  # the grammar ended, then only stop tokens
    for variant, kw in (("coupled", dict(kv_cache_blocks=256)), ("preemption", dict(kv_cache_blocks=12))):
        engine = make_engine(json_triple, max_model_len=48, speculative_tokens=3, **kw)
        got = {k: v[0].token_ids for k, v in run(engine, requests).items()}
        assert got == want, variant
        assert engine.stats().spec_accepted_tokens_total > 0, variant
        assert engine.scheduler.num_preemptions > 0 or variant == "coupled"
    engine = make_engine(json_triple, max_model_len=128, kv_cache_blocks=256, speculative_tokens=3,
                         speculative_method="rejection")
    params = SamplingParams(n=4, temperature=1.0, seed=2, max_tokens=60, structured_outputs=so)
    outs = run(engine, {"r": (PROMPT, params)})["r"]
    assert all(satisfied(kind, o.text) for o in outs if o.finish_reason == "stop"), [o.text for o in outs]
    assert any(o.finish_reason == "stop" for o in outs)
    assert engine.stats().spec_accepted_tokens_total > 0


def test_a_round_past_the_end_of_a_request_does_not_fail_it(json_triple: tuple) -> None:
    """A round also draws positions after the request's end (max_tokens, here): where none of them admits a
    token (the finished choice allows only EOS, which allowed_token_ids excludes) the round failed the
    request and its batch-mate, though plain decoding finishes it by length. A request that does reach
    such a position still gets NoAdmissibleToken, as in plain decoding."""
    from rast_engine.errors import NoAdmissibleToken

    ids = make_engine(json_triple).tokenizer.encode("the cat", add_special_tokens=False)
    fits = SamplingParams(temperature=0.0, max_tokens=len(ids), structured_outputs={"choice": ["the cat"]},
                          allowed_token_ids=sorted(set(ids)))
    requests = {"fits": (PROMPT, fits), "mate": ([7, 30, 4, 9], SamplingParams(temperature=0.0, max_tokens=8))}
    want = {k: (v[0].token_ids, v[0].finish_reason) for k, v in run(make_engine(json_triple), requests).items()}
    assert want["fits"] == (ids, "length")
    for gamma in (2, 3):
        engine = make_engine(json_triple, speculative_tokens=gamma)
        assert {k: (v[0].token_ids, v[0].finish_reason) for k, v in run(engine, requests).items()} == want
    # one round drafts every token after the prefill's, and the run stops before the failed position: all
    # of it drafts accepted (it was counted as if its last token were the target's own)
    engine = make_engine(json_triple, speculative_tokens=len(ids))
    assert run(engine, {"fits": requests["fits"]})["fits"][0].token_ids == ids
    assert engine.stats().spec_accepted_tokens_total == len(ids) - 1
    beyond = {"beyond": (PROMPT, replace(fits, max_tokens=len(ids) + 2))}
    for gamma in (0, 3):
        with pytest.raises(NoAdmissibleToken) as failed:
            run(make_engine(json_triple, speculative_tokens=gamma), beyond)
        assert failed.value.request_ids == ("beyond",)


@pytest.mark.gpu
def test_gpu_speculative_rounds_give_structured_outputs_the_plain_tokens(json_triple: tuple) -> None:
    """On a GPU the drafts reach the matchers through pinned copies and events while the next forward
    runs: the tokens are still the plain engine's (float32, coupled)."""
    requests = {f"{kind}-{i}": ([7 + i, 30, 4, 9], SamplingParams(temperature=0.8 * i, seed=i, max_tokens=30,
                                                                   structured_outputs=CASES[kind]))
                for kind in ("json", "regex") for i in range(2)}
    requests["free"] = (PROMPT, SamplingParams(temperature=1.0, seed=9, max_tokens=20, ignore_eos=True))
    kw = dict(device="cuda", max_model_len=64, kv_cache_blocks=128)
    want = {k: v[0].token_ids for k, v in run(make_engine(json_triple, **kw), requests).items()}
    engine = make_engine(json_triple, speculative_tokens=3, **kw)
    assert {k: v[0].token_ids for k, v in run(engine, requests).items()} == want
    assert engine.stats().spec_accepted_tokens_total > 0
