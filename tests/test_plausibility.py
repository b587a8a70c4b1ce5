"""plausibility_alpha (engine/plausibility.py) against HF transformers: z = M + λ (R − S) with −inf wherever
M's own logit is below its top logit + ln α. Contrastive decoding is the triple (M, M, S): z = (1 + β) M − β S.
Sampled tokens are replayed with rast_sample on the oracle's masked z and the engine's promised seed."""
from __future__ import annotations

import math

import pytest
import torch

import rast_kernels
from rast_engine import LLM, SamplingParams
from rast_engine.errors import RastError
from rast_engine.evaluation.runner import EvalConfig
from rast_engine.sampling_params import sample_seed
from test_engine import hf_eq3, hf_model

PROMPT = [5, 9, 9, 17, 4, 9, 30, 2, 11]


def masked_z(triple: tuple, ids: list[int], lam: float, alpha: float, vocab: int) -> torch.Tensor:
    """[1, V]: the oracle's z at the last position, masked by M's own plausibility."""
    z = hf_eq3(triple, ids, lam, vocab)[-1:]
    with torch.no_grad():
        m = hf_model(triple[0])(torch.tensor([ids])).logits[0, -1:, :vocab].float()
    return z.masked_fill(m < m.max() + math.log(alpha), float("-inf"))


def oracle(triple: tuple, lam: float, alpha: float, vocab: int, steps: int, params: SamplingParams,
           mask: bool = True) -> list[int]:
    ids = list(PROMPT)
    for t in range(steps):
        z = masked_z(triple, ids, lam, alpha, vocab) if mask else hf_eq3(triple, ids, lam, vocab)[-1:]
        if params.temperature == 0:
            ids.append(int(z.argmax()))
        else:
            ids.append(int(rast_kernels.rast_sample(z, temperature=params.temperature, seed=sample_seed(params.seed, 0),
                                                    offset=t, backend="torch")[0]))
    return ids[len(PROMPT):]


def generate(llm: LLM, params: SamplingParams) -> list[int]:
    return llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def contrastive(qwen2_triple: tuple) -> tuple[LLM, tuple]:
    large, _, base = qwen2_triple
    llm = LLM(str(large), str(large), str(base), lam=0.5, block_size=4, kv_cache_blocks=64, seed=3)
    return llm, (large, large, base)


def test_contrastive_decoding_is_hf_masked(contrastive: tuple) -> None:
    """small_rl = M's own directory, λ = β = 0.5, α = 0.1: greedy and seeded sampled tokens are the oracle's,
    M running once for both roles; without the mask the sampled tokens would differ."""
    llm, triple = contrastive
    assert len(llm.llm_engine.runner.units) == 2  # M and S: M's directory loads and runs once
    vocab = llm.llm_engine.vocab_size
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, plausibility_alpha=0.1)
    assert generate(llm, greedy) == oracle(triple, 0.5, 0.1, vocab, 8, greedy)
    sampled = SamplingParams(temperature=1.0, seed=5, max_tokens=8, ignore_eos=True, plausibility_alpha=0.1)
    got = generate(llm, sampled)
    assert got == oracle(triple, 0.5, 0.1, vocab, 8, sampled)
    assert got != oracle(triple, 0.5, 0.1, vocab, 8, sampled, mask=False)  # the oracle tells the two apart


def test_the_mask_inside_rast_and_in_speculative_rounds(qwen2_triple: tuple) -> None:
    """RAST's own triple with α = 0.3: the oracle's sampled tokens, beside an unmasked request in the same
    batch; a speculative engine (coupled: the mask on the verify only) gives the plain engine's tokens."""
    kw = dict(lam=0.7, block_size=4, kv_cache_blocks=96, seed=3)
    plain = LLM(*map(str, qwen2_triple), **kw)
    params = SamplingParams(temperature=1.0, seed=9, max_tokens=10, ignore_eos=True, plausibility_alpha=0.3)
    unmasked = SamplingParams(temperature=1.0, seed=9, max_tokens=10, ignore_eos=True)
    outs = [o.outputs[0].token_ids for o in plain.generate([PROMPT, PROMPT], [params, unmasked], use_tqdm=False)]
    vocab = plain.llm_engine.vocab_size
    assert outs[0] == oracle(qwen2_triple, 0.7, 0.3, vocab, 10, params)
    assert outs[1] == oracle(qwen2_triple, 0.7, 0.3, vocab, 10, unmasked, mask=False) != outs[0]
    speculative = LLM(*map(str, qwen2_triple), speculative_tokens=3, **kw)
    assert generate(speculative, params) == outs[0]


def test_bad_alpha_is_refused() -> None:
    for alpha in (-0.1, 1.5, float("nan"), "0.1"):
        with pytest.raises(RastError, match="plausibility_alpha"):
            SamplingParams(plausibility_alpha=alpha)
    with pytest.raises(RastError, match="plausibility-alpha"):
        EvalConfig(model="m", data="d", out="o", plausibility_alpha=2.0)
