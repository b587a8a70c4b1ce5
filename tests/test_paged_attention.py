"""Paged-attention kernels against a naive oracle written here, independently of every backend.

The oracle gathers each sequence's keys through its block table one token at a time, repeats KV heads
for GQA, and runs an explicit float32 softmax with the causal mask. Without CUDA the kernels run in the
Triton interpreter on tiny fp32, bf16 and fp16 shapes; with CUDA the same cases run natively.
"""
from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from rast_kernels.split_k import split_plan

HAS_CUDA = torch.cuda.is_available()
CASES = [
    pytest.param("cpu", torch.float32, id="interp-fp32",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="with CUDA the kernels compile natively instead")),
    pytest.param("cpu", torch.bfloat16, id="interp-bf16",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="with CUDA the kernels compile natively instead")),
    pytest.param("cpu", torch.float16, id="interp-fp16",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="with CUDA the kernels compile natively instead")),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=pytest.mark.gpu),
]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}


def paged(context_lens: list[int], block_size: int, spare: int, seed: int) -> tuple[torch.Tensor, int]:
    """Block tables over a shuffled pool (ids never contiguous by construction), rows padded with 0."""
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(n / block_size) for n in context_lens]
    num_blocks = sum(need) + spare
    ids = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(context_lens), max(need), dtype=torch.int32)
    at = 0
    for b, k in enumerate(need):
        table[b, :k] = ids[at:at + k]
        at += k
    return table, num_blocks


def gather(cache: torch.Tensor, table_row: torch.Tensor, n: int) -> torch.Tensor:
    bs = cache.shape[1]
    rows = [cache[int(table_row[j // bs]), j % bs] for j in range(n)]
    return torch.stack(rows).float() if rows else cache.new_zeros(0, *cache.shape[2:]).float()


def oracle(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], q_lens: list[int],
           scale: float) -> torch.Tensor:
    """q [T, Hq, D]; keys[b], values[b] [n_b, Hkv, D]: each sequence's last q_lens[b] positions attend."""
    outs, at = [], 0
    for k, v, m in zip(keys, values, q_lens):
        qs = q[at:at + m].float()
        at += m
        group = qs.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        n = k.shape[0]
        scores = torch.einsum("lhd,nhd->hln", qs, k) * scale
        pos = torch.arange(n - m, n)
        scores = scores.masked_fill(torch.arange(n)[None, :] > pos[:, None], float("-inf"))
        outs.append(torch.einsum("hln,nhd->lhd", torch.softmax(scores, dim=-1), v))
    return torch.cat(outs)


def rand(*shape: int, dtype: torch.dtype, device: str, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device,dtype", CASES)
def test_store_kv_cache_skips_minus_one(device: str, dtype: torch.dtype) -> None:
    from rast_kernels.kv_store import store_kv_cache

    g = torch.Generator().manual_seed(0)
    num_blocks, bs, hkv, dim, t = 5, 4, 2, 16, 9
    k_cache = rand(num_blocks, bs, hkv, dim, dtype=dtype, device=device, g=g)
    v_cache = rand(num_blocks, bs, hkv, dim, dtype=dtype, device=device, g=g)
    kv = rand(t, 2 * hkv, dim, dtype=dtype, device=device, g=g)
    k, v = kv[:, :hkv], kv[:, hkv:]  # strided views, as split from a fused projection
    slots = torch.randperm(num_blocks * bs, generator=g)[:t]
    slots[[1, 4]] = -1
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k.view(-1, hkv, dim)[s] = k[i]
            want_v.view(-1, hkv, dim)[s] = v[i]
    store_kv_cache(k, v, k_cache, v_cache, slots.to(device))
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("hq,hkv,dim,bs,lens,splits", [
    (4, 2, 32, 4, [37, 5, 20], 1),       # many blocks of 4 per 16-token tile
    (4, 2, 32, 4, [37, 5, 20], 3),       # split-K (16-token floor); the short sequence fills one split
    (3, 1, 16, 16, [50, 1], 4),          # group of 3 (padded to the tile), odd head count
    (2, 2, 16, 16, [70], None),          # heuristic split choice, plain multi-head
])
def test_decode_matches_oracle(device: str, dtype: torch.dtype, hq: int, hkv: int, dim: int, bs: int,
                               lens: list[int], splits: int | None) -> None:
    from rast_kernels.paged_attention import paged_decode_attention

    g = torch.Generator().manual_seed(len(lens) * 100 + dim)
    table, num_blocks = paged(lens, bs, spare=3, seed=1)
    k_cache = rand(num_blocks, bs, hkv, dim, dtype=dtype, device=device, g=g)
    v_cache = rand(num_blocks, bs, hkv, dim, dtype=dtype, device=device, g=g)
    q = rand(len(lens), hq, dim, dtype=dtype, device=device, g=g)
    scale = dim ** -0.5
    out = paged_decode_attention(q, k_cache, v_cache, table.to(device), torch.tensor(lens, dtype=torch.int32,
                                 device=device), scale, num_splits=splits, min_tokens_per_split=16)
    keys = [gather(k_cache.cpu(), table[b], n) for b, n in enumerate(lens)]
    values = [gather(v_cache.cpu(), table[b], n) for b, n in enumerate(lens)]
    want = oracle(q.cpu(), keys, values, [1] * len(lens), scale)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float().cpu(), want, **TOL[dtype])


@triton.jit
def _plan_kernel(ctx_ptr, tps_ptr, used_ptr, n, num_splits, min_tokens, BLOCK: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tps, used = split_plan(tl.load(ctx_ptr + i, mask=i < n, other=0), num_splits, min_tokens, BLOCK_N)
    tl.store(tps_ptr + i, tps, mask=i < n)
    tl.store(used_ptr + i, used, mask=i < n)


@pytest.mark.parametrize("num_splits,min_tokens,block_n", [(1, 256, 64), (3, 1, 16), (8, 16, 16), (64, 256, 64),
                                                             (5, 100, 32)])
def test_split_plan_is_the_shortest_tile_aligned_cut(num_splits: int, min_tokens: int, block_n: int) -> None:
    """Each context is covered by `used` tile-aligned splits, no more than the grid's splits or than
    cdiv(ctx, min_tokens); its longest split has the fewest tiles any such cut allows (brute force)."""
    device = "cuda" if HAS_CUDA else "cpu"
    ctx = torch.arange(0, 1100, dtype=torch.int32)
    tps, used = torch.empty_like(ctx), torch.empty_like(ctx)
    ctx_d, tps_d, used_d = ctx.to(device), tps.to(device), used.to(device)
    _plan_kernel[(1,)](ctx_d, tps_d, used_d, len(ctx), num_splits, min_tokens, BLOCK=2048, BLOCK_N=block_n)
    for c, t, u in zip(ctx.tolist(), tps_d.tolist(), used_d.tolist()):
        if c == 0:
            assert (t, u) == (0, 0)
            continue
        allowed = min(num_splits, -(-c // min_tokens))
        assert t % block_n == 0 and 1 <= u <= allowed and (u - 1) * t < c <= u * t, (c, t, u)
        fewest = min(-(-(-(-c // k)) // block_n) for k in range(1, allowed + 1))
        assert t // block_n == fewest, (c, t, u)


@pytest.mark.parametrize("device,dtype", CASES)
def test_decode_in_a_wide_padded_table(device: str, dtype: torch.dtype) -> None:
    """A CUDA-graph batch: short and long contexts, and padding rows of context 0, in a block table far
    wider than any of them, whose padding points at a NaN block. Every split count, from 1 to more than
    a sequence has tiles, matches the oracle, reads nothing past a context, and gives the same result
    as the tight table (the split sizes follow each context, not the table width)."""
    from rast_kernels.paged_attention import paged_decode_attention

    hq, hkv, dim, bs, width = 3, 1, 16, 4, 48
    lens = [37, 0, 3, 90, 0]
    g = torch.Generator().manual_seed(11)
    tight, num_blocks = paged(lens, bs, spare=0, seed=4)
    wide = torch.full((len(lens), width), num_blocks, dtype=torch.int32)  # the NaN block
    wide[:, :tight.shape[1]] = tight
    for b, n in enumerate(lens):
        wide[b, -(-n // bs):] = num_blocks
    k_cache = rand(num_blocks + 1, bs, hkv, dim, dtype=dtype, device=device, g=g)
    v_cache = rand(num_blocks + 1, bs, hkv, dim, dtype=dtype, device=device, g=g)
    k_cache[num_blocks] = float("nan")
    v_cache[num_blocks] = float("nan")
    q = rand(len(lens), hq, dim, dtype=dtype, device=device, g=g)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    keys = [gather(k_cache.cpu(), tight[b], n) for b, n in enumerate(lens)]
    values = [gather(v_cache.cpu(), tight[b], n) for b, n in enumerate(lens)]
    want = oracle(q.cpu(), keys, values, [1] * len(lens), 0.25)
    want[[1, 4]] = 0.0  # softmax over no key: the oracle's NaN, the kernel's zeros
    for splits, min_tokens in [(1, 256), (3, 16), (7, 1), (24, 1), (None, 16)]:
        kw = dict(num_splits=splits, min_tokens_per_split=min_tokens)
        out = paged_decode_attention(q, k_cache, v_cache, wide.to(device), ctx, 0.25, **kw)
        torch.testing.assert_close(out.float().cpu(), want, **TOL[dtype], msg=f"{kw}")
        assert torch.equal(out[[1, 4]], torch.zeros_like(out[[1, 4]]))
        if splits is not None:
            assert torch.equal(out, paged_decode_attention(q, k_cache, v_cache, tight.to(device), ctx, 0.25, **kw))


@pytest.mark.parametrize("device,dtype", CASES)
def test_decode_empty_context_gives_zeros(device: str, dtype: torch.dtype) -> None:
    """CUDA-graph padding rows carry context length 0: their output must be finite zeros."""
    from rast_kernels.paged_attention import paged_decode_attention

    g = torch.Generator().manual_seed(3)
    cache = rand(4, 4, 1, 16, dtype=dtype, device=device, g=g)
    q = rand(2, 2, 16, dtype=dtype, device=device, g=g)
    table = torch.tensor([[2, 0], [0, 0]], dtype=torch.int32, device=device)
    lens = torch.tensor([3, 0], dtype=torch.int32, device=device)
    for splits in (1, 2):
        out = paged_decode_attention(q, cache, cache, table, lens, 0.25, num_splits=splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("hq,hkv,dim,bs,prefix,new", [
    (4, 2, 16, 4, [0, 0, 0], [19, 3, 8]),    # plain varlen prefill, several 16-row query tiles
    (4, 1, 32, 16, [21, 0, 16], [6, 9, 17]),  # cached prefixes (prefix hit, chunk) beside a fresh sequence
])
def test_prefill_matches_oracle(device: str, dtype: torch.dtype, hq: int, hkv: int, dim: int, bs: int,
                                prefix: list[int], new: list[int]) -> None:
    from rast_kernels.kv_store import store_kv_cache
    from rast_kernels.paged_attention import paged_prefill_attention

    g = torch.Generator().manual_seed(sum(new))
    lens = [p + n for p, n in zip(prefix, new)]
    table, num_blocks = paged(lens, bs, spare=2, seed=2)
    k_cache = rand(num_blocks, bs, hkv, dim, dtype=dtype, device=device, g=g)
    v_cache = rand(num_blocks, bs, hkv, dim, dtype=dtype, device=device, g=g)
    t = sum(new)
    q = rand(t, hq, dim, dtype=dtype, device=device, g=g)
    k = rand(t, hkv, dim, dtype=dtype, device=device, g=g)
    v = rand(t, hkv, dim, dtype=dtype, device=device, g=g)
    keys, values, slots, at = [], [], [], 0
    for b, (p, n) in enumerate(zip(prefix, new)):
        keys.append(torch.cat([gather(k_cache.cpu(), table[b], p), k[at:at + n].cpu().float()]))
        values.append(torch.cat([gather(v_cache.cpu(), table[b], p), v[at:at + n].cpu().float()]))
        slots += [int(table[b, j // bs]) * bs + j % bs for j in range(p, p + n)]
        at += n
    cu = torch.tensor([0] + new, dtype=torch.int32).cumsum(0).to(torch.int32)
    store_kv_cache(k, v, k_cache, v_cache, torch.tensor(slots, device=device))
    scale = 0.3
    out = paged_prefill_attention(q, k_cache, v_cache, table.to(device), torch.tensor(lens, dtype=torch.int32,
                                  device=device), cu.to(device), max(new), scale)
    torch.testing.assert_close(out.float().cpu(), oracle(q.cpu(), keys, values, new, scale), **TOL[dtype])


def test_rejects_mismatched_inputs() -> None:
    from rast_kernels.kv_store import store_kv_cache
    from rast_kernels.paged_attention import paged_decode_attention

    cache = torch.zeros(2, 4, 2, 16)
    table, lens = torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(TypeError, match="caches q.s dtype"):
        paged_decode_attention(torch.zeros(1, 4, 16, dtype=torch.float16), cache, cache, table, lens, 1.0)
    with pytest.raises(ValueError, match="KV heads"):
        paged_decode_attention(torch.zeros(1, 3, 16), cache, cache, table, lens, 1.0)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv_cache(torch.zeros(3, 2, 16), torch.zeros(3, 2, 16), cache, cache, torch.zeros(2, dtype=torch.long))
    # a float32 v was narrowed into an fp16 cache unchecked (inf), a float slot truncated (5.5 -> 5)
    half = cache.half()
    with pytest.raises(TypeError, match="v must have k's dtype"):
        store_kv_cache(torch.zeros(1, 2, 16).half(), torch.full((1, 2, 16), 1e6), half, half,
                       torch.zeros(1, dtype=torch.long))
    with pytest.raises(TypeError, match="slot_mapping must be an int32 or int64 tensor"):
        store_kv_cache(torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), cache, cache, torch.tensor([5.5]))
    with pytest.raises(TypeError, match="block_tables must be an int32 or int64 tensor"):
        paged_decode_attention(torch.zeros(1, 4, 16), cache, cache, table.float(), lens, 1.0)
    with pytest.raises(TypeError, match="context_lens must be an int32 or int64 tensor"):
        paged_decode_attention(torch.zeros(1, 4, 16), cache, cache, table, lens.bool(), 1.0)
