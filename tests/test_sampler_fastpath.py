"""The Triton sampler's candidate fast path (rast_kernels.sampler_triton): rows that take it and rows
that must fall back to the full-row search both give the reference's distribution and the same
tokens, whichever path they take. Paths are forced through the launch plan (cap, chunk, block)."""
from __future__ import annotations

import pytest
import torch

import rast_kernels as rk
from rast_kernels import reference
from rast_kernels.batch import normalize

if "triton" not in rk.available_backends():
    pytest.skip("triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
from rast_kernels import sampler_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(batch, **plan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, fast flags, probs) of the Triton backend under one launch plan."""
    fast = torch.empty(batch.batch, dtype=torch.int64, device=DEVICE)
    ids = sampler_triton.sample(batch, fast_out=fast, **plan)
    return ids, fast, sampler_triton.probs(batch, **plan)


def _check(batch, want_fast: list[int], **plan) -> torch.Tensor:
    ids, fast, probs = _run(batch, **plan)
    torch.testing.assert_close(probs, reference.probs(batch), rtol=1e-4, atol=1e-6)
    assert torch.equal(ids, reference.sample(batch))
    assert fast.tolist() == want_fast  # last: a wrong path must first show as a wrong result
    return ids


def _peaked(gen: torch.Generator, b: int, v: int) -> torch.Tensor:
    return (torch.randn(b, v, generator=gen) * 3.0).to(DEVICE)


def test_fast_path_rows_match_reference_and_fallback() -> None:
    """Peaked rows under each filter take the fast path; forcing the fallback (one candidate slot per
    chunk, top_k above it) must draw the very same tokens."""
    gen = torch.Generator().manual_seed(21)
    logits = _peaked(gen, 6, 300)
    deltas = [(_peaked(gen, 6, 303), _peaked(gen, 6, 300))]
    kw = dict(weights=0.3, temperature=torch.tensor([1.0, 0.8, 1.2, 1.0, 0.5, 1.0], device=DEVICE),
              top_k=torch.tensor([0, 7, 0, 20, 3, 0], dtype=torch.int32, device=DEVICE),
              top_p=torch.tensor([0.9, 1.0, 1.0, 0.95, 0.5, 0.7], device=DEVICE),
              min_p=torch.tensor([0.0, 0.0, 0.05, 0.0, 0.1, 0.2], device=DEVICE))
    for seed in range(3):
        batch = normalize(logits, deltas, seed=torch.arange(6, device=DEVICE) * 13 + seed, offset=seed, **kw)
        fast_ids = _check(batch, [1] * 6)
        slow_ids, slow, _ = _run(batch, cap=1, chunk=300)  # one candidate per row: only top_k <= 1 fits
        assert slow.tolist() == [0] * 6 and torch.equal(fast_ids, slow_ids)


def test_flat_row_overflows_budget() -> None:
    """Equal logits: every token is a candidate, the budget overflows, the spilled tokens tie with the
    mode (kc = 0, U empty), so the row falls back and stays uniform."""
    logits = torch.zeros(2, 200, device=DEVICE)
    batch = normalize(logits, (), top_p=0.5, top_k=torch.tensor([0, 10], dtype=torch.int32, device=DEVICE),
                      seed=torch.tensor([1, 2], device=DEVICE))
    _check(batch, [0, 0], cap=8)
    _check(batch, [1, 1], cap=256, chunk=256)  # everything fits: no non-candidate, fast and exact


def test_top_p_mass_spread_beyond_margin() -> None:
    """A mode plus a wide tail just outside the candidate margin: at top_p = 0.99 the tail carries the
    missing mass, so the candidates alone cannot decide (fallback admits the tail); at top_p = 0.9
    the mode's mass reaches the limit and the fast path admits it alone."""
    v = 2000
    logits = torch.full((2, v), -(sampler_triton.WIDE + 0.5), device=DEVICE)
    logits[:, 123] = 0.0
    batch = normalize(logits, (), top_p=torch.tensor([0.99, 0.9], device=DEVICE),
                      seed=torch.tensor([5, 6], device=DEVICE))
    _check(batch, [0, 1])
    probs = sampler_triton.probs(batch)
    assert int((probs[0] > 0).sum()) == v and int((probs[1] > 0).sum()) == 1


def test_top_k_larger_than_budget() -> None:
    gen = torch.Generator().manual_seed(22)
    logits = _peaked(gen, 3, 400)
    logits[1, [10, 50, 150, 250, 390]] += 40.0  # five clear winners: the only candidates of row 1
    k = torch.tensor([40, 3, 40], dtype=torch.int32, device=DEVICE)
    batch = normalize(logits, (), top_k=k, top_p=torch.tensor([1.0, 0.9, 0.8], device=DEVICE),
                      seed=torch.arange(3, device=DEVICE))
    _check(batch, [0, 1, 0], block=32, chunk=128, cap=8)  # 4 chunks x 8 slots < 40


def test_late_winners_replace_early_candidates() -> None:
    """Ascending logits in one chunk (16 lanes of 16 tokens): each lane's list keeps replacing early, poor
    tokens with later ones, which move into the non-candidate summary, so the chunk ends holding its 64
    best tokens and the fast path holds, exactly, in both orders. With top_p = 0.999 the summarised
    tail carries the missing mass, so only the full-row search can decide."""
    up = torch.linspace(-8.0, 0.0, 256, device=DEVICE)[None, :]
    logits = torch.cat([up, up.flip(1), up]).contiguous()
    top_p = torch.tensor([0.6, 0.6, 0.999], device=DEVICE)
    batch = normalize(logits, (), top_p=top_p, min_p=0.0, seed=torch.tensor([3, 4, 5], device=DEVICE))
    _check(batch, [1, 1, 0], block=16, chunk=256, cap=64)


def test_lane_lists_and_floor_on_lm_like_rows() -> None:
    """Zipf-like rows in random token order, 16 tokens per lane and a small budget: the lanes' lists
    (64 lanes x 4) hold more entries than CAP, so the chunk's floor cuts them, and every path (top-k,
    top-p, min-p, RAST pair) still matches the reference token for token and takes the fast path."""
    gen = torch.Generator().manual_seed(25)
    b, v = 4, 2048
    rank = torch.arange(1, v + 1, dtype=torch.float32)
    z = -1.6 * torch.log(rank) + 0.5 * torch.randn(b, v, generator=gen)
    logits = torch.gather(z, 1, torch.argsort(torch.rand(b, v, generator=gen), dim=1)).to(DEVICE)
    base = (torch.randn(b, v, generator=gen) * 2.0).to(DEVICE)
    rl = base + 0.3 * torch.randn(b, v, generator=gen).to(DEVICE)
    batch = normalize(logits, [(rl, base)], weights=1.0, top_p=torch.tensor([0.9, 0.95, 1.0, 0.9], device=DEVICE),
                      top_k=torch.tensor([0, 0, 20, 0], dtype=torch.int32, device=DEVICE),
                      min_p=torch.tensor([0.0, 0.0, 0.0, 0.05], device=DEVICE), seed=torch.arange(b, device=DEVICE))
    _check(batch, [1, 1, 1, 1], block=64, chunk=1024, cap=64)


def test_tokens_displaced_from_a_lane_bound_the_candidates() -> None:
    """Six of the best tokens fall in one lane (16 lanes of 16 tokens), in rising order: the lane keeps
    four and the two it displaced (4.6 and 4.5) enter the summary, so the largest non-candidate is 4.6
    and a stored 4.55 from another lane lies outside U. The fast path holds where the four kept tokens
    decide (top_p 0.5, top_k 4) and not where a displaced one is admissible (top_p 0.9, top_k 5);
    without the displaced tokens' max it would hold there too and draw from too few tokens."""
    logits = torch.full((4, 256), -5.0, device=DEVICE)
    logits[:, 0:96:16] = torch.tensor([4.5, 4.6, 4.7, 4.8, 4.9, 5.0], device=DEVICE)
    logits[:, 1] = 4.55
    batch = normalize(logits, (), top_p=torch.tensor([0.5, 0.9, 1.0, 1.0], device=DEVICE),
                      top_k=torch.tensor([0, 0, 5, 4], dtype=torch.int32, device=DEVICE),
                      seed=torch.arange(4, device=DEVICE) + 7)
    _check(batch, [1, 0, 0, 1], block=16, chunk=256, cap=64)


def test_min_p_alone_and_unfiltered_rows() -> None:
    """min-p alone decides the fast path through the largest non-candidate's w; a row without any
    filter stores no candidates and always takes the full-row draw; greedy and empty rows neither."""
    gen = torch.Generator().manual_seed(23)
    logits = _peaked(gen, 4, 300)
    logits[3] = float("-inf")
    batch = normalize(logits, (), min_p=torch.tensor([0.05, 0.0, 0.3, 0.1], device=DEVICE),
                      temperature=torch.tensor([1.0, 1.0, 0.0, 1.0], device=DEVICE),
                      seed=torch.arange(4, device=DEVICE))
    ids = _check(batch, [1, 0, 0, 0])
    assert ids[3].item() == -1


def test_fast_rows_in_a_mixed_batch_are_batch_invariant() -> None:
    gen = torch.Generator().manual_seed(24)
    logits = _peaked(gen, 5, 250)
    logits[2] = 0.0  # a flat row that falls back next to fast rows
    top_p = torch.tensor([0.9, 0.95, 0.3, 1.0, 0.8], device=DEVICE)
    seed = torch.arange(5, device=DEVICE) + 40
    full = _check(normalize(logits, (), top_p=top_p, temperature=0.3, seed=seed), [1, 1, 0, 0, 1], cap=16)
    for r in range(5):
        row = normalize(logits[r:r + 1], (), top_p=top_p[r:r + 1], temperature=0.3, seed=seed[r:r + 1])
        one = sampler_triton.sample(row, cap=16)
        assert one.item() == full[r].item()
