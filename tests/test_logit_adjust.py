"""logit_bias, min_tokens and the presence, frequency and repetition penalties against an independent
oracle: HF transformers' forward of the three models gives Eq. 3's combined logits; the bias is added and
min_tokens' stop ids masked by hand, HF's RepetitionPenaltyLogitsProcessor applies the repetition penalty
over prompt and output, and a plain loop over the output's token counts applies the frequency and presence
penalties (vLLM's definitions and order). The engine's greedy tokens and its logprobs (of the distribution
it samples from) must match; rows without adjustments must not notice their neighbours'."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from logit_adjust_util import PENALTIES, PROMPTS, make_engine, oracle_greedy, oracle_logits, record_launches, run

from rast_engine import SamplingParams
from rast_engine.errors import RastError


@pytest.mark.parametrize("ahead", [False, True])
def test_greedy_penalized_tokens_equal_the_oracle(qwen2_triple: tuple, ahead: bool) -> None:
    """Also with async scheduling (``ahead``), where each step is launched before the last token reaches
    the host and its counts take that token on the device."""
    engine = make_engine(qwen2_triple, **(dict(async_output=True, async_scheduling=True) if ahead else {}))
    launched = record_launches(engine)
    vocab = engine.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, **PENALTIES)
    plain = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    outs = run(engine, {"p0": (PROMPTS[0], params), "p1": (PROMPTS[1], params), "plain": (PROMPTS[1], plain)})
    for prompt, rid in zip(PROMPTS, ("p0", "p1")):
        ids = list(prompt)
        for _ in range(params.max_tokens):
            ids.append(int(oracle_logits(qwen2_triple, ids, len(prompt), vocab, params).argmax()))
        assert outs[rid][0].token_ids == ids[len(prompt):]
    alone = run(make_engine(qwen2_triple), {"plain": (PROMPTS[1], plain)})
    assert outs["plain"][0].token_ids == alone["plain"][0].token_ids
    assert outs["p1"][0].token_ids != outs["plain"][0].token_ids  # the penalties did change something
    assert any(launched) == ahead


def test_logprobs_are_those_of_the_penalized_distribution(qwen2_triple: tuple) -> None:
    """Sampled, n = 2 (the fork's first draw has no output yet), temperature 0.8: each chosen token's
    logprob is log_softmax(z'' / T) of the oracle's penalized logits at that step."""
    engine = make_engine(qwen2_triple)
    params = SamplingParams(n=2, temperature=0.8, max_tokens=8, seed=3, logprobs=0, ignore_eos=True, **PENALTIES)
    outs = run(engine, {"r": (PROMPTS[0], params)})["r"]
    for sample in outs:
        ids = list(PROMPTS[0])
        for token, entry in zip(sample.token_ids, sample.logprobs):
            z = oracle_logits(qwen2_triple, ids, len(PROMPTS[0]), engine.vocab_size, params)
            want = torch.log_softmax(z.double() / params.temperature, dim=0)[token].item()
            assert entry[token] == pytest.approx(want, abs=2e-4)
            ids.append(token)


@pytest.mark.parametrize("variant", ["preemption", "chunked prefill", "async scheduling", "admitted ahead"])
def test_penalized_tokens_survive_preemption_chunking_and_async_scheduling(qwen2_triple: tuple,
                                                                           variant: str) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=5, ignore_eos=True, **PENALTIES)
    requests = {f"r{i}": ([7 + i, 9, 9, 30 + i, 4], params) for i in range(4)}
    if variant == "admitted ahead":  # a prefill launched ahead admits r2 while r0 decodes after a pending token
        requests = {f"r{i}": ([7 + i, 9, 9, 30 + i, 4], replace(params, max_tokens=m)) for i, m in enumerate((12, 4, 9))}
    want = run(make_engine(qwen2_triple), requests)
    kw = {"preemption": dict(kv_cache_blocks=12, max_model_len=32), "chunked prefill": dict(max_num_batched_tokens=3),
          "async scheduling": dict(async_output=True, async_scheduling=True),
          "admitted ahead": dict(async_output=True, async_scheduling=True, max_num_seqs=2)}[variant]
    engine = make_engine(qwen2_triple, **kw)
    launched = record_launches(engine)
    got = run(engine, requests)
    assert {k: v[0].token_ids for k, v in got.items()} == {k: v[0].token_ids for k, v in want.items()}
    if variant == "preemption":
        assert engine.scheduler.num_preemptions > 0
    if variant.startswith("a"):  # the counts take each pending token on the device
        assert len(launched) > 1 and all(launched[:-1])  # the last found nothing to launch


def test_penalty_values_are_checked(qwen2_triple: tuple) -> None:
    for kw in (dict(presence_penalty=2.5), dict(frequency_penalty=-3.0), dict(repetition_penalty=0.0),
               dict(repetition_penalty=1e-39), dict(repetition_penalty=float("nan"))):
        with pytest.raises(RastError, match=next(iter(kw))):
            SamplingParams(**kw)
    assert not SamplingParams().penalized and SamplingParams(presence_penalty=0.1).penalized
    engine = make_engine(qwen2_triple, speculative_tokens=2)  # rounds apply penalties (test_speculative_adjust.py)
    engine.add_request("x", PROMPTS[0], SamplingParams(repetition_penalty=1.2))
    assert list(engine.groups) == ["x"]


def test_logit_bias_and_min_tokens_equal_the_oracle(qwen2_triple: tuple) -> None:
    engine = make_engine(qwen2_triple)
    vocab = engine.vocab_size
    first = run(engine, {"p": (PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))})
    a, b = first["p"][0].token_ids[:2]  # plain greedy's first two tokens
    greedy = dict(temperature=0.0, max_tokens=10)
    cases = {
        "bias": SamplingParams(**greedy, logit_bias={a: -100.0, 11: 6.0}),
        # without min_tokens, stop_token_ids=[b] would end it after two tokens
        "min_tokens": SamplingParams(**greedy, min_tokens=6, stop_token_ids=[b], logit_bias={b: 3.0}),
        "all": SamplingParams(**greedy, min_tokens=3, stop_token_ids=[b], logit_bias={a: 2.5, b: 1.0, 11: -1.0},
                              **PENALTIES),
    }
    requests = {rid: (PROMPTS[0], p) for rid, p in cases.items()}
    requests["plain"] = (PROMPTS[1], SamplingParams(**greedy, ignore_eos=True))
    outs = run(engine, requests)
    for rid, params in cases.items():
        want = oracle_greedy(qwen2_triple, PROMPTS[0], vocab, params)
        assert (outs[rid][0].token_ids, outs[rid][0].finish_reason) == want, rid
    assert outs["bias"][0].token_ids[0] != a
    assert len(outs["min_tokens"][0].token_ids) >= 6 and b not in outs["min_tokens"][0].token_ids[:6]
    alone = run(make_engine(qwen2_triple), {"plain": requests["plain"]})
    assert outs["plain"][0].token_ids == alone["plain"][0].token_ids


def test_bias_and_min_tokens_steps_are_launched_ahead(qwen2_triple: tuple) -> None:
    """They need only the number of tokens so far: async scheduling launches their steps ahead, and the
    tokens are those of the synchronous engine (min_tokens counts the pending tokens)."""
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=5, min_tokens=8, stop_token_ids=[9],
                            logit_bias={9: 4.0, 4: -2.0})
    requests = {f"r{i}": ([7 + i, 9, 9, 30 + i, 4], params) for i in range(4)}
    want = run(make_engine(qwen2_triple), requests)
    engine = make_engine(qwen2_triple, async_output=True, async_scheduling=True)
    launched = record_launches(engine)
    got = run(engine, requests)
    assert {k: v[0].token_ids for k, v in got.items()} == {k: v[0].token_ids for k, v in want.items()}
    assert sum(launched) > 0
    assert all(9 not in v[0].token_ids[:8] for v in got.values())
    assert any(v[0].finish_reason == "stop" for v in got.values())  # the stop id, biased, does come later


def test_bias_and_min_tokens_are_checked(qwen2_triple: tuple) -> None:
    for kw in (dict(logit_bias={-1: 1.0}), dict(logit_bias={3: 100.5}), dict(logit_bias={3: float("nan")}),
               dict(logit_bias={"3": 1.0}), dict(logit_bias=[(3, 1.0)]), dict(min_tokens=-1),
               dict(min_tokens=17, max_tokens=16), dict(min_tokens=1.0)):
        with pytest.raises(RastError, match=next(iter(kw))):
            SamplingParams(**kw)
    assert not SamplingParams(logit_bias={3: 0.0}).adjusts_logits  # a zero bias changes nothing
    assert SamplingParams(logit_bias={3: -0.5}).adjusts_logits and SamplingParams(min_tokens=1).adjusts_logits
    engine = make_engine(qwen2_triple)
    with pytest.raises(RastError, match="outside the vocabulary"):
        engine.add_request("x", PROMPTS[0], SamplingParams(logit_bias={engine.vocab_size: 1.0}))
    assert not engine.groups


def test_finished_samples_release_their_penalty_counts(qwen2_triple: tuple) -> None:
    """A sample's [V] counts live on the device while it runs: with n = 12 through 3 slots at most 3
    samples hold them at once (every finished one kept them until the request ended: O(n V) memory)."""
    from rast_engine.sequence import SequenceStatus

    engine = make_engine(qwen2_triple, max_num_seqs=3)
    params = SamplingParams(n=12, temperature=1.0, max_tokens=4, seed=0, ignore_eos=True, repetition_penalty=1.3)
    engine.add_request("r", PROMPTS[0], params)
    most, finished_seen = 0, 0
    while engine.has_unfinished_requests():
        engine.step()
        group = engine.groups.get("r")
        seqs = group.seqs if group is not None else []
        most = max(most, sum(s.output_counts is not None for s in seqs))
        finished_seen = max(finished_seen, sum(s.status is SequenceStatus.FINISHED for s in seqs))
    assert finished_seen >= 3 and 1 <= most <= 3
