"""rast_logprobs against a float64 oracle (log_softmax of z / T over the admissible set, which the spec
defines), in every backend, at temperatures where probabilities underflow float32; and the engine's sample
logprobs at such a temperature against HF transformers' forwards of the three models."""
from __future__ import annotations

import pytest
import torch

import rast_kernels as rk

BACKENDS = [b for b in ("torch", "triton", "native") if b in rk.available_backends()]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def oracle(z: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor) -> torch.Tensor:
    """float64 [B, V] from the definitions, row by row: log_softmax(z / T) over the tokens that survive
    top-k (z >= the k-th largest), then top-p (the mass strictly more probable than the token, among the
    top-k survivors, is < top_p), then min-p (p >= min_p p_max); greedy rows: log one-hot on the mode."""
    out = torch.full(z.shape, float("-inf"), dtype=torch.float64)
    for r in range(z.shape[0]):
        zr, t = z[r].double(), float(temperature[r])
        if t <= 0:
            out[r, int(zr.argmax())] = 0.0
            continue
        keep = torch.ones_like(zr, dtype=torch.bool)
        if 0 < int(top_k[r]) < len(zr):
            keep &= zr >= zr.topk(int(top_k[r])).values[-1]
        p = torch.where(keep, torch.softmax(torch.where(keep, zr / t, float("-inf")), 0), 0.0)
        above = torch.stack([p[(zr > zr[i]) & keep].sum() for i in range(len(zr))])
        keep &= (above < float(top_p[r])) | (float(top_p[r]) >= 1.0)
        keep &= p >= float(min_p[r]) * p.max()
        out[r] = torch.log_softmax(torch.where(keep, zr / t, float("-inf")), 0)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_stay_finite_where_probabilities_underflow(backend: str, device: str) -> None:
    if device == "cuda" and backend == "native":
        pytest.skip("the native backend is CPU only")
    gen = torch.Generator().manual_seed(0)
    b, v = 6, 300
    z = (torch.randn(b, v, generator=gen) * 4).to(device)
    temperature = torch.tensor([0.02, 0.02, 0.05, 1.0, 0.0, 0.03], device=device)
    top_k = torch.tensor([0, 40, 0, 0, 0, 5], dtype=torch.int32, device=device)
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.95, 1.0, 1.0], device=device)
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.05, 0.0, 0.0], device=device)
    got = rk.rast_logprobs(z, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, backend=backend)
    want = oracle(z.cpu(), temperature.cpu(), top_k.cpu(), top_p.cpu(), min_p.cpu())
    got = got.cpu()
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite], atol=2e-3, rtol=1e-6)
    # the case the log of rast_probs lost: admissible tokens whose probability is 0 in float32
    probs = rk.rast_probs(z, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, backend=backend).cpu()
    lost = finite & (probs == 0)
    assert lost[0].sum() > 100 and lost[1].sum() > 10 and want[lost].max() < -103
    torch.testing.assert_close(got.exp(), probs, atol=1e-6, rtol=1e-4)  # the same distribution
    # one k for every row, as a Python scalar: a top-k of k values instead of a sort (ties at the k-th kept)
    tied = z.clone()
    tied[:, 20:24] = tied[:, 19:20]
    for k in (0, 40, 1, v - 1):
        got = rk.rast_logprobs(tied, temperature=temperature, top_k=k, top_p=top_p, min_p=min_p, backend=backend)
        want = oracle(tied.cpu(), temperature.cpu(), torch.full((b,), k), top_p.cpu(), min_p.cpu())
        assert torch.equal(torch.isfinite(got.cpu()), torch.isfinite(want)), k
        finite = torch.isfinite(want)
        torch.testing.assert_close(got.cpu()[finite].double(), want[finite], atol=2e-3, rtol=1e-6)


def test_rows_without_admissible_tokens_are_all_minus_inf() -> None:
    z = torch.tensor([[float("nan"), float("inf"), float("-inf")], [0.0, 1.0, 2.0]])
    got = rk.rast_logprobs(z, temperature=torch.tensor([1.0, float("nan")]), backend="torch")
    assert torch.isneginf(got).all()


def test_engine_logprobs_at_low_temperature_equal_hf(qwen2_triple: tuple) -> None:
    """logprobs=5 at T = 0.01: five alternatives at every position, each log_softmax(z / T) of HF's Eq. 3
    logits (the log of float32 probabilities dropped those below -103.9 and blurred those below -87)."""
    from test_engine import LAM, PROMPTS, hf_eq3

    from rast_engine import LLM, SamplingParams

    llm = LLM(*map(str, qwen2_triple), lam=LAM, block_size=4, kv_cache_blocks=64, device="cpu", dtype="float32")
    params = SamplingParams(temperature=0.01, max_tokens=3, seed=1, logprobs=5, ignore_eos=True)
    out = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    ids = list(out.prompt_token_ids)
    deepest = 0.0
    for tok, entry in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
        want = torch.log_softmax(hf_eq3(qwen2_triple, ids, LAM, llm.llm_engine.vocab_size)[-1].double() / 0.01, -1)
        top = want.topk(5)
        assert set(entry) == set(top.indices.tolist()) | {tok}
        for t, value in entry.items():
            assert value == pytest.approx(float(want[t]), abs=2e-3)
        deepest = min(deepest, float(top.values[-1]))
        ids.append(tok)
    assert deepest < -103.9  # the run reached the underflow


@pytest.mark.parametrize("speculative, adjusted", [(0, True), (2, True), (0, False)])
def test_raw_logprobs_are_the_combination_before_temperature_filters_and_adjustments(qwen2_triple: tuple,
                                                                                    speculative: int,
                                                                                    adjusted: bool) -> None:
    """logprobs_mode="raw_logprobs" (vLLM's): log_softmax of HF's Eq. 3 logits at T = 1, whatever the request's
    temperature, top-k/top-p, logit_bias and penalty, in plain steps and in speculative rounds; the default
    ("processed_logprobs") gives the filtered distribution the tokens were drawn from instead."""
    from test_engine import LAM, PROMPTS, hf_eq3

    from rast_engine import LLM, SamplingParams

    adjustments = {"logit_bias": {7: 5.0}, "repetition_penalty": 1.3} if adjusted else {}  # eager steps, or not
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, max_tokens=4, seed=3, logprobs=3, ignore_eos=True,
                            **adjustments)
    outs = {}
    for mode in ("raw_logprobs", "processed_logprobs"):
        llm = LLM(*map(str, qwen2_triple), lam=LAM, block_size=4, kv_cache_blocks=64, device="cpu", dtype="float32",
                  logprobs_mode=mode, speculative_tokens=speculative)
        outs[mode] = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0]
    raw, processed, vocab = outs["raw_logprobs"], outs["processed_logprobs"], llm.llm_engine.vocab_size
    assert raw.outputs[0].token_ids == processed.outputs[0].token_ids  # the mode changes the logprobs alone
    ids = list(raw.prompt_token_ids)
    for tok, entry, filtered in zip(raw.outputs[0].token_ids, raw.outputs[0].logprobs, processed.outputs[0].logprobs):
        want = torch.log_softmax(hf_eq3(qwen2_triple, ids, LAM, vocab)[-1].double(), -1)
        assert set(entry) == set(want.topk(3).indices.tolist()) | {tok}
        for t, value in entry.items():
            assert value == pytest.approx(float(want[t]), abs=1e-4)
        assert filtered[tok] > entry[tok] + 1e-3  # the filtered distribution renormalised over fewer tokens
        ids.append(tok)
