"""Speculative RAST decoding (engine/speculative): the accept/reject step against exact probabilities,
and the engine's rounds against plain decoding and against HF transformers' forwards. The rounds in the GPU
configuration (CUDA graphs, streams) are in test_speculative_graphs.py."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rast_engine import LLM, EngineConfig, LLMEngine, SamplingParams
from rast_engine.errors import RastError
from rast_engine.speculative.accept import accept_drafts

LAM = 0.7
PROMPTS = ["what is the answer? let us think", "a small model can steer", "one two three four five",
           "what is the answer? let us think again"]


# ---- the accept/reject step -------------------------------------------------------------------------
def _probs(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.softmax(torch.randn(*shape, generator=gen) * 1.5, dim=-1)


def _emitted(accepted: torch.Tensor, nxt: torch.Tensor, drafts: torch.Tensor, j: int) -> torch.Tensor:
    """The token each row emits at position j (rows whose run is shorter: -1)."""
    out = torch.where(accepted > j, drafts[:, min(j, drafts.shape[1] - 1)], torch.full_like(nxt, -1))
    return torch.where(accepted == j, nxt, out)


def test_accepted_tokens_follow_the_target_exactly() -> None:
    """Rows share p (3 positions) and q (2 positions) and differ in seeds: each position's emitted token,
    given that the run reaches it, has the target's distribution, and the run length has the
    acceptance probabilities Σ min(p, q) (speculative sampling's theorem; chi-square / binomial)."""
    from scipy.stats import chisquare  # the dev extra, which the GPU image lacks (its tests are below)

    gen = torch.Generator().manual_seed(0)
    vocab, g, rows = 6, 2, 60_000
    p, q = _probs(gen, g + 1, vocab), _probs(gen, g, vocab)
    drafts = torch.stack([torch.multinomial(q[j], rows, replacement=True, generator=gen) for j in range(g)], dim=1)
    seeds = torch.arange(rows, dtype=torch.int64) * 7919 + 3
    accepted, nxt = accept_drafts(p.expand(rows, -1, -1), q.expand(rows, -1, -1), drafts, seeds, seeds ^ 0x55,
                                  torch.full((rows,), 11, dtype=torch.int64))
    alpha = torch.minimum(p[:g], q).sum(-1).double()
    reach = [1.0, alpha[0].item(), (alpha[0] * alpha[1]).item()]
    for j in range(g + 1):
        got = (accepted >= j).double().mean().item()
        assert got == pytest.approx(reach[j], abs=5 * (reach[j] * (1 - reach[j]) / rows) ** 0.5 + 1e-12)
        tokens = _emitted(accepted, nxt, drafts, j)
        tokens = tokens[tokens >= 0]
        counts = torch.bincount(tokens, minlength=vocab).double()
        expected = p[j].double() / p[j].double().sum() * len(tokens)
        assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-4, j


def test_accept_step_is_greedy_on_one_hot_rows_and_batch_invariant() -> None:
    one_hot = torch.eye(5)
    p = torch.stack([one_hot[[2, 3, 1]], one_hot[[2, 4, 0]]])  # [2, 3, 5]
    q = torch.stack([one_hot[[2, 3]], one_hot[[2, 3]]])
    drafts = torch.tensor([[2, 3], [2, 3]])
    zeros = torch.zeros(2, dtype=torch.int64)
    accepted, nxt = accept_drafts(p, q, drafts, zeros + 5, zeros + 6, zeros)
    assert accepted.tolist() == [2, 1] and nxt.tolist() == [1, 4]  # all pass then p's mode; else p's mode
    q[0, 0] = 0  # a draft row that admitted nothing (its draw, -1, read as token 2 here): always rejected
    accepted, nxt = accept_drafts(p, q, drafts, zeros + 5, zeros + 6, zeros)
    assert accepted.tolist() == [0, 1] and nxt.tolist() == [2, 4]
    gen = torch.Generator().manual_seed(1)
    p, q = _probs(gen, 8, 3, 7), _probs(gen, 8, 2, 7)
    drafts = torch.multinomial(q.view(-1, 7), 1, generator=gen).view(8, 2)
    seeds, offset = torch.arange(8, dtype=torch.int64) * 31, torch.arange(8, dtype=torch.int64)
    whole = accept_drafts(p, q, drafts, seeds, seeds + 1, offset)
    for i in range(8):
        alone = accept_drafts(p[i:i + 1], q[i:i + 1], drafts[i:i + 1], seeds[i:i + 1], seeds[i:i + 1] + 1,
                              offset[i:i + 1])
        assert (alone[0].item(), alone[1].item()) == (whole[0][i].item(), whole[1][i].item())


def test_a_rejection_without_residual_mass_draws_from_the_target() -> None:
    """p <= q everywhere with p != q (p = q up to rounding): a rejected draft leaves max(0, p - q) all zero,
    and the next token comes from p instead of no token."""
    gen = torch.Generator().manual_seed(2)
    rows = 256
    q = _probs(gen, 1, 6)
    p = torch.cat([q.clone(), _probs(gen, 1, 6)])
    p[0, 0] *= 0.5  # the drafted token: rejected with probability 1/2, nothing above q anywhere
    drafts = torch.zeros(rows, 1, dtype=torch.int64)
    seeds = torch.arange(rows, dtype=torch.int64)
    accepted, nxt = accept_drafts(p.expand(rows, -1, -1), q.expand(rows, -1, -1), drafts, seeds, seeds + 9, seeds)
    rejected = accepted == 0
    assert 0.3 < rejected.double().mean().item() < 0.7
    assert (nxt >= 0).all() and (p[0, nxt[rejected]] > 0).all()


# ---- the engine ---------------------------------------------------------------------------------------
def _runs(llm: LLM, params: list[SamplingParams]) -> list[list[tuple]]:
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs]


@pytest.mark.parametrize("gamma, draft, blocks, method", [(1, "small", 128, "rejection"), (3, "small", 14, "rejection"),
                                                          (4, "rl", 128, "rejection"), (6, "rl", 14, "coupled")])
def test_greedy_rounds_give_the_plain_tokens(near_triple: tuple, gamma: int, draft: str, blocks: int,
                                             method: str) -> None:
    """Greedy requests through rounds of γ drafts equal plain decoding, with stop tokens and strings that
    end a run midway, forks of n = 3, the context's end (max_model_len, where rounds shrink to fit) and a
    KV cache small enough to preempt (blocks=14)."""
    kw = dict(lam=LAM, block_size=4, max_model_len=40)
    plain = LLM(*near_triple, kv_cache_blocks=128, **kw)
    first = plain.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[first.token_ids[7]]),
              SamplingParams(temperature=0.0, max_tokens=24, stop=[first.text[10:13]]),
              SamplingParams(temperature=0.0, max_tokens=5, n=3)]
    spec = LLM(*near_triple, kv_cache_blocks=blocks, speculative_tokens=gamma, speculative_draft=draft,
               speculative_method=method, **kw)
    want, got = _runs(plain, params), _runs(spec, params)
    assert got == want
    assert {r[2] for req in got for r in req} == {"length", "stop"}
    stats = spec.llm_engine.stats()
    assert 0 < stats.spec_accepted_tokens_total < stats.spec_draft_tokens_total  # both branches taken
    assert stats.kv_blocks_used == 0 and (blocks == 128 or spec.llm_engine.scheduler.num_preemptions > 0)
    mine = spec.generate(PROMPTS[:1], params[0], use_tqdm=False)[0].outputs[0].logprobs
    theirs = plain.generate(PROMPTS[:1], params[0], use_tqdm=False)[0].outputs[0].logprobs
    assert [sorted(a) for a in mine] == [sorted(b) for b in theirs]
    assert max(abs(a[k] - b[k]) for a, b in zip(mine, theirs) for k in a) < 1e-5


def test_a_first_draw_in_a_decode_step_forks_without_sharing_lookahead(near_triple: tuple) -> None:
    """A prompt whose last chunk stops one token short makes its first draw (n = 2) in a decode step: that
    step decodes plainly, so the fork shares no lookahead block the samples' rounds would both write (a
    review helper's reproducer: the second sample's tokens changed). Seeded samples equal a one-step
    prefill's."""
    prompt = [5, 17, 33, 42, 8, 61, 29, 77]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=12, ignore_eos=True, seed=1234)
    runs = []
    for budget in (64, 7):
        llm = LLM(*near_triple, lam=LAM, block_size=2, kv_cache_blocks=64, max_model_len=40, speculative_tokens=4,
                  max_num_batched_tokens=budget, enable_prefix_caching=False)
        runs.append([c.token_ids for c in llm.generate([prompt], params, use_tqdm=False)[0].outputs])
        assert llm.llm_engine.stats().kv_blocks_used == 0
    assert runs[0] == runs[1]


def test_the_two_drafts_are_different_distributions(near_triple: tuple) -> None:
    """λ != 1: R alone and S + λ(R − S) draft differently, so greedy rounds accept differently (the
    tokens stay the plain ones)."""
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    counts, tokens = [], []
    for draft in ("small", "rl"):
        llm = LLM(*near_triple, lam=LAM, block_size=4, kv_cache_blocks=64, speculative_tokens=3, speculative_draft=draft)
        tokens.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)])
        stats = llm.llm_engine.stats()
        counts.append((stats.spec_draft_tokens_total, stats.spec_accepted_tokens_total))
    assert tokens[0] == tokens[1] and counts[0] != counts[1]


@pytest.mark.parametrize("gamma, draft, blocks", [(2, "small", 128), (4, "rl", 14), (6, "small", 128)])
def test_coupled_rounds_give_the_plain_sampled_tokens(near_triple: tuple, gamma: int, draft: str, blocks: int) -> None:
    """The coupled method: seeded sampled requests (top-p, top-k, min-p, forks, logprobs) give exactly the
    plain engine's tokens, with preemptions (blocks=14) and rounds of any length; a seeded request's
    tokens do not depend on the rounds, so not on its neighbours either (one near max_model_len
    shortens every round of its batch)."""
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, ignore_eos=True, seed=3, n=3),
              SamplingParams(temperature=0.8, top_k=5, max_tokens=24, seed=4, logprobs=1),
              SamplingParams(temperature=1.2, min_p=0.05, max_tokens=24, seed=5, n=2),
              SamplingParams(temperature=1.0, max_tokens=24, seed=6)]
    kw = dict(lam=LAM, block_size=4, max_model_len=48)
    spec = LLM(*near_triple, kv_cache_blocks=blocks, speculative_tokens=gamma, speculative_draft=draft, **kw)
    want = [[c.token_ids for c in o.outputs] for o in LLM(*near_triple, kv_cache_blocks=128, **kw).generate(
        PROMPTS, params, use_tqdm=False)]
    assert [[c.token_ids for c in o.outputs] for o in spec.generate(PROMPTS, params, use_tqdm=False)] == want
    stats = spec.llm_engine.stats()
    assert 0 < stats.spec_accepted_tokens_total < stats.spec_draft_tokens_total
    assert blocks == 128 or spec.llm_engine.scheduler.num_preemptions > 0
    near_end = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    alone = spec.generate(PROMPTS[3:], params[3], use_tqdm=False)[0].outputs[0].token_ids
    beside = spec.generate([PROMPTS[3], [9] * 40], [params[3], near_end], use_tqdm=False)[0].outputs[0].token_ids
    assert alone == beside == want[3][0]


def test_sampled_rounds_follow_rast_from_hf_forwards(near_triple: tuple) -> None:
    """The rejection method: second tokens sampled through rounds (draft accepted or replaced), given the
    most frequent first token, against softmax(top-4 of M + λ(R − S)) from HF forwards (chi-square)."""
    from scipy.stats import chisquare

    llm = LLM(*near_triple, lam=LAM, block_size=4, kv_cache_blocks=512, max_num_seqs=128, speculative_tokens=3,
              speculative_method="rejection")
    prompt = llm.get_tokenizer().encode(PROMPTS[1])
    params = SamplingParams(n=3000, temperature=1.0, top_k=4, max_tokens=2, ignore_eos=True, seed=11)
    outs = [c.token_ids for c in llm.generate([prompt], params, use_tqdm=False)[0].outputs]
    stats = llm.llm_engine.stats()
    assert 0 < stats.spec_accepted_tokens_total < stats.spec_draft_tokens_total
    first = max(set(o[0] for o in outs), key=[o[0] for o in outs].count)
    seconds = torch.tensor([o[1] for o in outs if o[0] == first])
    with torch.no_grad():
        z = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(torch.tensor([prompt + [first]])).logits[0, -1]
             for d in near_triple]
    v = llm.llm_engine.vocab_size
    combined = (z[0][:v] + LAM * (z[1][:v] - z[2][:v])).double()
    top = combined.topk(4)
    expected = torch.softmax(top.values, 0) * len(seconds)  # float64: sums to the count
    counts = torch.stack([(seconds == t).sum() for t in top.indices]).double()
    assert counts.sum().item() == len(seconds)  # nothing outside the top 4
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-4


def test_speculative_config_errors(qwen2_triple: tuple) -> None:
    large, rl, base = map(str, qwen2_triple)
    with pytest.raises(RastError, match="needs a small pair"):
        EngineConfig(large, speculative_tokens=2)
    with pytest.raises(RastError, match="async_scheduling"):
        EngineConfig(large, rl, base, speculative_tokens=2, async_output=True, async_scheduling=True)
    with pytest.raises(RastError, match="speculative_draft"):
        EngineConfig(large, rl, base, speculative_tokens=2, speculative_draft="large")
    with pytest.raises(RastError, match="speculative_method"):
        EngineConfig(large, rl, base, speculative_tokens=2, speculative_method="typical")
    with pytest.raises(RastError, match="speculative_tokens must be"):
        EngineConfig(large, rl, base, speculative_tokens=-1)
    with pytest.raises(RastError, match="also fills a small role"):  # the large model as R: nothing to draft with
        LLMEngine(EngineConfig(large, large, base, speculative_tokens=2, device="cpu", kv_cache_blocks=16))
