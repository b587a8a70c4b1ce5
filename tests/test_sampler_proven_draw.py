"""_select's proven draw on the fast path (rast_kernels.sampler_triton_proven._proven_draw): instead of
searching the top-p (or lone top-k) threshold among the candidates, it takes the best Gumbel score
left and checks that token against the filter, rejecting every key at least as large when it fails.
Whether the first try holds, a later one, or the tries run out and the row searches its threshold,
the token must be the reference's for every seed."""
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
ROWS = 16


def _tries(batch, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, tries) of sample(); every row here must take the fast path and draw the token of the
    same kernels searching every threshold (proof_tries=0) and, where exact (interpreted, where the
    arithmetic is the reference's bit for bit), the reference's."""
    fast, tries, searched = (torch.empty(batch.batch, dtype=torch.int64, device=batch.logits.device)
                             for _ in range(3))
    ids = sampler_triton.sample(batch, fast_out=fast, tries_out=tries)
    assert not exact or torch.equal(ids, reference.sample(batch))
    assert torch.equal(ids, sampler_triton.sample(batch, proof_tries=0, tries_out=searched))
    assert fast.tolist() == [1] * batch.batch and searched.tolist() == [0] * batch.batch
    return ids, tries


def _plateau(gen: torch.Generator, width: int, v: int = 300) -> torch.Tensor:
    """ROWS rows of ``width`` near-equal tokens far above the rest: all of them candidates, and a small
    top_p or top_k keeps few, so a draw over the plateau mostly falls outside A (the expected number
    of tries grows like the log of the plateau's width over A's)."""
    logits = torch.full((ROWS, v), -30.0)
    for r in range(ROWS):
        logits[r, torch.randperm(v, generator=gen)[:width]] = 0.3 * torch.randn(width, generator=gen)
    return logits.to(DEVICE)


def test_lm_like_rows_are_proven_at_the_first_tries() -> None:
    """Peaked rows under top-p (with min-p and a delta pair), top-k alone, and top-k with top-p: every
    row is settled by its draws, none searches, and the first try mostly holds."""
    gen = torch.Generator().manual_seed(31)
    logits = (torch.randn(ROWS, 400, generator=gen) * 3.0).to(DEVICE)
    deltas = [tuple((torch.randn(ROWS, 400, generator=gen) * 3.0).to(DEVICE) for _ in range(2))]
    third = ROWS // 3
    top_k = torch.tensor([0] * third + [20] * third + [30] * (ROWS - 2 * third), dtype=torch.int32, device=DEVICE)
    top_p = torch.tensor([0.95] * third + [1.0] * third + [0.9] * (ROWS - 2 * third), device=DEVICE)
    min_p = torch.tensor([0.0, 0.02] * (ROWS // 2), device=DEVICE)
    firsts = 0
    for seed in range(3):
        batch = normalize(logits, deltas, weights=0.3, top_k=top_k, top_p=top_p, min_p=min_p,
                          seed=torch.arange(ROWS, device=DEVICE) * 7 + seed, offset=seed)
        _, tries = _tries(batch)
        assert int((tries == 0).sum()) == 0
        firsts += int((tries == 1).sum())
    assert firsts >= 3 * ROWS * 3 // 4  # top_p >= 0.9 or top-k: the first try holds most of the time


@pytest.mark.parametrize("width,filters,searches", [(200, dict(top_p=0.01), True), (250, dict(top_k=2), True),
                                                     (64, dict(top_p=0.3, min_p=0.5), False)])
def test_rejected_draws_retry_or_search(width: int, filters: dict, searches: bool) -> None:
    """A plateau of near-equal tokens under a tiny top_p or a top_k of 2: the draws keep missing A, so
    rows settle after several tries or run out of them and search; with min-p on top, most draws it
    admits are also in the nucleus. Each kind occurs among these seeds (the counts are theirs) and
    every token is the reference's."""
    gen = torch.Generator().manual_seed(32)
    logits = _plateau(gen, width)
    retried = searched = 0
    for seed in range(4):
        batch = normalize(logits, (), seed=torch.arange(ROWS, device=DEVICE) + 100 * seed, **filters)
        _, tries = _tries(batch)
        retried += int((tries > 1).sum())
        searched += int((tries == 0).sum())
    assert retried > 0 and (searched > 0) == searches


def test_a_rejected_key_rejects_its_ties() -> None:
    """One token at 1.5 over ten exactly tied at 1.0, top_p = 0.1: the nucleus is the one token. A draw
    of a tied token rejects all ten at once (their keys are equal), so the second try always holds."""
    logits = torch.full((ROWS, 200), -30.0, device=DEVICE)
    logits[:, 40:50] = 1.0
    logits[:, 120] = 1.5
    batch = normalize(logits, (), top_p=0.1, seed=torch.arange(ROWS, device=DEVICE) + 9)
    ids, tries = _tries(batch)
    assert ids.tolist() == [120] * ROWS
    assert set(tries.tolist()) == {1, 2}


@pytest.mark.gpu
def test_lm_like_rows_at_a_real_vocabulary_on_the_gpu() -> None:
    """bench/sampler.py's LM-like RAST rows at Qwen2.5's vocabulary under the GPU's own launch plans
    (B = 1, 32 and 256): every row is proven by its draws, none searches, and each draws what the
    same kernels draw when they search every threshold."""
    from bench_runs import load_bench

    bench = load_bench("sampler.py")
    gen, rows, vocab, dev = torch.Generator().manual_seed(3), 256, 152064, torch.device("cuda")
    logits, pair = bench.lm_logits(rows, vocab, dev, gen), bench.rast_pair(rows, vocab, dev, gen)
    top_k = torch.tensor([0, 0, 50, 50], dtype=torch.int32, device=dev).repeat(rows // 4)
    min_p = torch.tensor([0.0, 0.05], device=dev).repeat(rows // 2)
    for size in (1, 32, 256):
        batch = normalize(logits[:size], [(pair[0][:size], pair[1][:size])], weights=1.0, top_p=0.95,
                          top_k=top_k[:size], min_p=min_p[:size], seed=torch.arange(size, device=dev))
        _, tries = _tries(batch, exact=False)
        assert int((tries == 0).sum()) == 0, size


def test_kth_key_search_on_consecutive_keys() -> None:
    """Keys one apart (d = consecutive floats above 1.0 behind a mode at 0): any off-by-one in the
    ternary top-k search (_kth_key) moves the threshold by one token. probs() always searches it, and so
    does sample() with top-k and top-p (Z_K is the top-k mass) or with proof_tries=0."""
    n, ks = 80, [1, 2, 3, 7, 20, 33, 64, 79]
    d = (torch.arange(n, dtype=torch.int32) + 0x3F800000).view(torch.float32)
    logits = torch.cat([torch.zeros(1), -d[: n - 1]]).repeat(len(ks), 1).to(DEVICE)
    top_k = torch.tensor(ks, dtype=torch.int32, device=DEVICE)
    batch = normalize(logits, (), top_k=top_k, seed=torch.arange(len(ks), device=DEVICE))
    probs = sampler_triton.probs(batch)
    assert (probs > 0).sum(dim=1).tolist() == ks
    torch.testing.assert_close(probs, reference.probs(batch), rtol=1e-5, atol=1e-7)
    for seed in range(3):
        kw = dict(top_k=top_k, seed=torch.arange(len(ks), device=DEVICE) + 10 * seed)
        for batch in (normalize(logits, (), top_p=0.999, **kw), normalize(logits, (), **kw)):
            fast = torch.empty(len(ks), dtype=torch.int64, device=DEVICE)
            ids = sampler_triton.sample(batch, proof_tries=0, fast_out=fast)
            assert torch.equal(ids, reference.sample(batch)) and fast.tolist() == [1] * len(ks)


def test_top_k_with_top_p_is_proven_by_bounds_or_after_its_search() -> None:
    """Top-k with top-p before the top-k search: mass(U, key < x) + w_x <= Z_K <= mass(U) decides most
    draws (tries below K_SEARCHED); the rest search top-k, then prove a draw against the exact limit
    (tries K_SEARCHED + n). Peaked rows and rows whose k-th key is tied many times over (top-k keeps every
    tie, so Z_K holds more than k tokens), fp32 and bf16: every token is the reference's."""
    from rast_kernels.sampler_triton_select import K_SEARCHED

    searched_mark = int(K_SEARCHED.value)

    gen = torch.Generator().manual_seed(33)
    peaked = torch.randn(ROWS, 400, generator=gen) * 3.0
    tied = torch.full((ROWS, 400), -30.0)
    for r in range(ROWS):  # three tokens above twelve tied at 1.0: top_k = 5 keeps all fifteen
        ids = torch.randperm(400, generator=gen)[:15]
        tied[r, ids[:3]] = torch.tensor([1.5, 2.0, 2.5])
        tied[r, ids[3:]] = 1.0
    top_k = torch.tensor([3, 10, 30, 5] * (ROWS // 4), dtype=torch.int32)
    top_p = torch.tensor([0.5, 0.8, 0.95, 0.3, 0.9, 0.6, 0.99, 0.7] * (ROWS // 8))
    bounded = searched = 0
    for logits, k in ((peaked, top_k), (peaked.to(torch.bfloat16), top_k), (tied, torch.full_like(top_k, 5))):
        for seed in range(2):
            batch = normalize(logits.to(DEVICE), (), top_k=k.to(DEVICE), top_p=top_p.to(DEVICE),
                              seed=torch.arange(ROWS, device=DEVICE) * 5 + 50 * seed)
            _, tries = _tries(batch)
            assert int((tries == 0).sum()) == 0
            bounded += int((tries < searched_mark).sum())
            searched += int((tries > searched_mark).sum())
    assert bounded > 2 * searched > 0  # the bounds settle most rows; some still search
