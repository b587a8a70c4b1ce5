"""The Triton sampler's verified draw (rast_kernels.sampler_triton_finish): top-p rows whose candidates
cannot hold the nucleus draw over every token first and keep the first of the best draws proven to lie
in the nucleus. They must return the reference's token for every seed, whether the proof succeeds
(path 1) or the row falls back to the full-row search (path 0). The fast path is shut off by the
launch plan: few candidate slots per chunk."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import rast_kernels as rk
from rast_kernels import reference
from rast_kernels.batch import normalize

if "triton" not in rk.available_backends():
    pytest.skip("triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
from rast_kernels import sampler_triton  # noqa: E402
from test_sampler_fuzz import cases  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NO_FAST = dict(cap=4)  # 4 slots a chunk: no nucleus below fits


def _paths(batch, **plan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fast = torch.empty(batch.batch, dtype=torch.int64, device=DEVICE)
    path = torch.empty(batch.batch, dtype=torch.int64, device=DEVICE)
    ids = sampler_triton.sample(batch, fast_out=fast, path_out=path, **plan)
    return ids, fast, path


def test_verified_draws_are_the_reference_tokens() -> None:
    """Flat rows (logit std 1.2, as random weights give) under top-p with and without min-p and a
    delta pair: every row is drawn by the verified path and equals the reference and the search."""
    gen = torch.Generator().manual_seed(5)
    b, v = 8, 700
    logits = (torch.randn(b, v, generator=gen) * 1.2).to(DEVICE)
    deltas = [((torch.randn(b, v + 5, generator=gen) * 1.2).to(DEVICE), torch.randn(b, v, generator=gen).to(DEVICE))]
    top_p = torch.tensor([0.95, 0.9, 0.8, 0.95, 0.99, 0.9, 0.95, 0.85], device=DEVICE)
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.02, 0.0, 0.05, 0.0, 0.01], device=DEVICE)
    temp = torch.tensor([1.0, 0.7, 1.3, 1.0, 1.0, 0.9, 2.0, 1.0], device=DEVICE)
    for seed in range(2):
        batch = normalize(logits, deltas, weights=0.4, temperature=temp, top_p=top_p, min_p=min_p,
                          seed=torch.arange(b, device=DEVICE) * 11 + seed, offset=seed)
        ids, fast, path = _paths(batch, **NO_FAST)
        assert torch.equal(ids, reference.sample(batch))
        assert torch.equal(ids, sampler_triton.sample(batch, verify=False, **NO_FAST))
        assert fast.tolist() == [0] * b and path.tolist() == [1] * b


def test_draws_outside_the_nucleus_fall_back_to_the_search() -> None:
    """A small top_p on a flat row: the best draws over all tokens mostly miss the nucleus, so some
    rows cannot be proven and take the full-row search; both kinds give the reference's token."""
    gen = torch.Generator().manual_seed(9)
    b, v = 12, 500
    logits = (torch.randn(b, v, generator=gen) * 0.5).to(DEVICE)
    batch = normalize(logits, (), top_p=0.1, seed=torch.arange(b, device=DEVICE) + 40)
    ids, _, path = _paths(batch, **NO_FAST)
    assert torch.equal(ids, reference.sample(batch))
    assert 0 < int((path == 1).sum()) < b  # both paths ran: the counts come from these fixed seeds


def test_top_k_rows_and_probs_keep_the_search() -> None:
    """Top-k rows off the fast path and probs() search the threshold as before (path 0), and the
    verified rows beside them in one batch are unaffected."""
    gen = torch.Generator().manual_seed(3)
    b, v = 4, 400
    logits = (torch.randn(b, v, generator=gen) * 1.2).to(DEVICE)
    batch = normalize(logits, (), top_p=0.9, top_k=torch.tensor([0, 300, 0, 250], dtype=torch.int32, device=DEVICE),
                      seed=torch.arange(b, device=DEVICE))
    ids, _, path = _paths(batch, **NO_FAST)
    assert torch.equal(ids, reference.sample(batch))
    assert path.tolist() == [1, 0, 1, 0]
    torch.testing.assert_close(sampler_triton.probs(batch, **NO_FAST), reference.probs(batch), rtol=1e-4, atol=1e-6)


def test_path_outputs_of_the_wrong_kind_are_refused() -> None:
    """path_out is written by the kernel: an int32 or short tensor would be overrun, so it is refused."""
    batch = normalize(torch.zeros(2, 50, device=DEVICE), (), top_p=0.9)
    for bad in (torch.empty(2, dtype=torch.int32, device=DEVICE), torch.empty(3, dtype=torch.int64, device=DEVICE),
                torch.empty(2, 2, dtype=torch.int64, device=DEVICE)[:, 0]):
        with pytest.raises(ValueError, match="path_out must be a contiguous int64"):
            sampler_triton.sample(batch, path_out=bad)
    with pytest.raises(ValueError, match="fast_out must be"):
        sampler_triton.sample(batch, fast_out=torch.empty(2, dtype=torch.float32, device=DEVICE))


def test_verified_rows_are_batch_invariant() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(5, 600, generator=gen) * 1.2).to(DEVICE)
    batch = normalize(logits, (), top_p=0.9, temperature=0.8, seed=torch.arange(5, device=DEVICE) * 3)
    full = sampler_triton.sample(batch, **NO_FAST)
    for i in range(5):
        row = normalize(logits[i:i + 1], (), top_p=0.9, temperature=0.8, seed=torch.tensor([i * 3], device=DEVICE))
        assert int(sampler_triton.sample(row, **NO_FAST)) == int(full[i])


def test_lane_second_bests_bound_the_proof() -> None:
    """One chunk of 16 lanes: each lane keeps its best draw only, so a token in the nucleus may hide
    behind its lane's winner. The proof accepts a draw only above every such hidden score; the tokens
    still equal the reference's across seeds, with both paths taken."""
    gen = torch.Generator().manual_seed(13)
    b, v = 16, 512
    logits = (torch.randn(b, v, generator=gen) * 0.8).to(DEVICE)
    batch = normalize(logits, (), top_p=0.3, seed=torch.arange(b, device=DEVICE) * 5 + 1)
    ids, _, path = _paths(batch, cap=4, block=16, chunk=v)
    assert torch.equal(ids, reference.sample(batch))
    assert 0 < int((path == 1).sum()) < b


@settings(max_examples=40 if not torch.cuda.is_available() else 60, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(cases())
def test_fuzzed_rows_off_the_fast_path_draw_admissible_ids(case: dict) -> None:
    """test_sampler_fuzz's inputs (NaN, +-inf, huge values, odd widths, any parameters) with one
    candidate slot a chunk and lanes that see two tokens each: every id drawn by either path lies in
    [-1, V), -1 exactly for rows without a finite token, and has positive reference probability. (Such
    fuzz cases send about 3 rows in 10 through the verified draw; exact tokens are checked above, on
    rows away from the float32 rounding cases that sampler_triton's docstring lists.)"""
    seed = case.pop("seed")
    batch = normalize(case.pop("logits").to(DEVICE), [(r.to(DEVICE), b.to(DEVICE)) for r, b in case.pop("deltas")],
                      seed=seed.to(DEVICE), **{k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in case.items()})
    ids, _, _ = _paths(batch, cap=1, block=8, chunk=16)
    probs = reference.probs(batch)
    assert bool(((ids >= -1) & (ids < batch.vocab)).all()), ids
    empty = probs.double().sum(dim=1) == 0
    assert bool(((ids == -1) == empty).all()), (ids, probs)
    drawn = ids >= 0
    assert bool((probs[drawn].gather(1, ids[drawn][:, None]) > 0).all()), (ids, probs)


@pytest.mark.gpu
def test_flat_rows_at_a_real_vocabulary_on_the_gpu() -> None:
    """Random-weight logits (N(0, 1.2²) per model, as bench/decode.py's models give) at Qwen2.5's
    vocabulary under each batch size's native plan: every top-p row is drawn by the verified path, and
    the tokens equal the threshold search's and the float64 reference's. (With min-p 0.02 such rows
    keep about 1000 tokens and mostly fit the candidates, so min-p stays off here.)"""
    from bench_runs import load_bench

    plans = load_bench("sampler_plans.py")
    gen, dev, vocab = torch.Generator().manual_seed(2), torch.device("cuda"), 152064
    for rows in (1, 8, 32):
        logits, rl, base = (plans.flat_logits(rows, vocab, dev, gen) for _ in range(3))
        batch = normalize(logits, [(rl, base)], weights=1.0, top_p=0.95, seed=torch.arange(rows, device=dev),
                          temperature=torch.tensor([1.0, 0.7, 1.5], device=dev).repeat(rows)[:rows])
        ids, fast, path = _paths(batch)
        assert path.tolist() == [1] * rows and fast.tolist() == [0] * rows
        assert torch.equal(ids, sampler_triton.sample(batch, verify=False))
        assert torch.equal(ids, reference.sample(batch))
