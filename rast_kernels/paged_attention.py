"""Paged-KV attention in Triton: decode (GQA, split-K) and varlen causal prefill (the store: kv_store).

Layout (see rast_engine.attention.metadata): k_cache, v_cache are [num_blocks, block_size, Hkv, D];
token j of sequence b lives at block ``block_tables[b, j // block_size]``, row ``j % block_size``.
Query head h reads KV head ``h // (Hq // Hkv)`` (HF ``repeat_kv`` order).

Algorithm. Every attention kernel walks the keys of one sequence in tiles of BLOCK_N tokens; a tile
may span several cache blocks, so each token's block id is gathered from the block table (block_size
need not divide BLOCK_N, nor be a power of two). Softmax is online (running max ``m``, running sum
``l``, accumulator ``acc``), in the log2 domain, always in float32; only the tile products take the
input dtype (fp32 uses IEEE dot, never TF32).
- decode: one program per (sequence, KV head, split). The G = Hq/Hkv query heads sharing a KV head
  form the M side of the tile product, so each KV tile is read once for the whole group. With split-K
  (rast_kernels.split_k) the grid has ``num_splits`` splits, a shape decision; each sequence cuts its
  own context among them on the device (a short one in a wide, graph-padded table uses few, a long one
  all). Each split holding tokens writes its partial (m, l, acc) in float32 and a second kernel
  rescales them by exp2(m_s - max m) and divides once.
- prefill: one program per (BLOCK_M new tokens, query head, sequence). The new tokens are the
  sequence's last q_len positions, so token i sits at position ``ctx - q_len + i`` and sees keys
  [0, that position]: a cached prefix and chunked prefill need no special case. The kernel reads
  keys from the cache, so the step's K/V must be stored first (the backends do so).
- a sliding ``window`` (HF's: the token at position p sees keys p - window < j <= p): decode starts
  its key range at ctx - window and split-K cuts that span; prefill starts each tile's loop at its first
  row's window and masks per row, so keys before every window are never read.

Invariants: no host sync anywhere (grids depend on shapes only, so CUDA graphs capture it);
a sequence with context length 0 (batch padding) yields zeros, never NaN; outputs take q's dtype.

Bytes moved (e = element size). decode: 2 * e * Hkv * D * sum_b n_b for the KV, which is the floor,
n_b = ctx_b (with a sliding window, min(ctx_b, window)), plus 4 * Hq * (D + 2) * 2 * sum_b S_b for split-K
partials, where S_b <= min(S, cdiv(n_b, 256)) counts the splits sequence b fills (a few percent of its
KV; empty splits write nothing). A context is never read past its length, however wide the (padded)
block table.
An FP8 cache: e = 1, plus an exponent byte a token and KV head (rast_kernels.fp8_kv).
prefill: each (query tile, head) reads the keys up to its causal edge, about
2 * e * Hq * D * sum_b ceil(q_len_b / BLOCK_M) * (prefix_b + q_len_b / 2); the G heads of one KV
head hit the same lines, which L2 absorbs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rast_kernels.fp8_cast import FP8
from rast_kernels.attention_tile import _tile_update
from rast_kernels.fp8_kv import block_size_of
from rast_kernels.kv_store import block_d, check_cache, check_indices, index_rows
from rast_kernels.launch import cdiv, interpreting, next_pow2
from rast_kernels.split_k import (MIN_TOKENS_PER_SPLIT, check_attention_options, pick_num_splits, split_plan,
                                  split_reduce_kernel, window_start)

LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, out_ptr, pm_ptr, pl_ptr, pacc_ptr, scale_log2,
                   stride_qb, stride_qh, stride_ob, stride_oh, stride_cb, stride_cr, stride_ch, stride_bt,
                   num_heads, group, head_dim, num_splits, min_tokens, window, softcap_log2,
                   BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP8: tl.constexpr, COMPILED: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    lo = window_start(ctx, window, SLIDING)  # the query (position ctx - 1) sees keys [lo, ctx)
    tokens_per_split, used = split_plan(ctx - lo, num_splits, min_tokens, BLOCK_N)
    start = lo + split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, ctx)  # an empty split (split >= used) runs no tile
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * group + g
    gd_mask = (g < group)[:, None] & (d < head_dim)[None, :]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gd_mask, other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        m_i, l_i, acc = _tile_update(q, m_i, l_i, acc, kc_ptr + kvh * stride_ch, vc_ptr + kvh * stride_ch,
                                     bt_ptr + b * stride_bt, n0, end, end, d, head_dim, stride_cb, stride_cr,
                                     scale_log2, window, softcap_log2, BLOCK_SIZE, BLOCK_N, False, False, SOFTCAP,
                                     PRECISION, UPCAST, FP8, COMPILED)
    if SPLIT:
        row = (b * num_heads + heads) * num_splits + split
        # the reduce reads the splits holding tokens only; a tensor: the interpreter rejects scalar masks
        live = (g < group) & (g * 0 + split < used)
        tl.store(pm_ptr + row, m_i, mask=live)
        tl.store(pl_ptr + row, l_i, mask=live)
        tl.store(pacc_ptr + row[:, None] * head_dim + d[None, :], acc, mask=gd_mask & live[:, None])
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptr = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=gd_mask)


@triton.jit
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, cu_ptr, out_ptr, scale_log2,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cr, stride_ch, stride_bt,
                    group, head_dim, window, softcap_log2, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP8: tl.constexpr, COMPILED: tl.constexpr):
    mb = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    kvh = h // group
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    ctx = tl.load(ctx_ptr + b)
    prefix = ctx - q_len
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    pos = prefix + i
    md_mask = (i < q_len)[:, None] & (d < head_dim)[None, :]
    rows = (q_start + i).to(tl.int64)[:, None]
    q = tl.load(q_ptr + rows * stride_qt + h * stride_qh + d[None, :], mask=md_mask, other=0.0)
    # keys past the tile's last row are causally invisible; a tile wholly past q_len does nothing
    hi = tl.where(mb * BLOCK_M < q_len, tl.minimum(ctx, prefix + (mb + 1) * BLOCK_M), 0)
    # and keys before the tile's first row's window are invisible to all its rows
    lo = window_start(prefix + mb * BLOCK_M + 1, window, SLIDING)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        m_i, l_i, acc = _tile_update(q, m_i, l_i, acc, kc_ptr + kvh * stride_ch, vc_ptr + kvh * stride_ch,
                                     bt_ptr + b * stride_bt, n0, hi, pos, d, head_dim, stride_cb, stride_cr,
                                     scale_log2, window, softcap_log2, BLOCK_SIZE, BLOCK_N, True, SLIDING, SOFTCAP,
                                     PRECISION, UPCAST, FP8, COMPILED)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptr = out_ptr + rows * stride_ot + h * stride_oh + d[None, :]
    tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=md_mask)


def tile_size(dim: int, dtype: torch.dtype) -> int:
    """Keys per tile, and query rows per prefill tile. A stage holds 2 * tile * D * e bytes of K and V,
    at most 32 KB (the tile halves for D > 128), so decode's 3 stages, or prefill's 2 beside its q tile,
    stay well under Hopper's 227 KB. fp32 takes 16: its exact ("ieee") dots run on the FMA units with
    the tiles in registers, and prefill at D = 64 with 64-row tiles, or D = 128 with 32, spills
    0.7-1.1 KB a thread on sm_90 (test_attention_compile checks there are no spills). The interpreter's
    cost grows with the tile, hence 16 there too."""
    if interpreting() or dtype == torch.float32:
        return 16
    return 64 if dim * dtype.itemsize <= 256 else 32


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit inputs


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float, *,
                           num_splits: int | None = None, min_tokens_per_split: int = MIN_TOKENS_PER_SPLIT,
                           window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """One query token per sequence: q [B, Hq, D] -> [B, Hq, D] over each sequence's cached keys (with a
    sliding ``window``, its last ``window`` keys). ``num_splits`` (None: from the shapes) sizes the
    split-K grid; each sequence fills as many splits as its own context allows at >=
    ``min_tokens_per_split`` tokens apiece (split_k.split_plan)."""
    if torch.compiler.is_compiling():  # one opaque op when traced (rast_kernels.ops)
        from rast_kernels import ops
        return ops.traced(ops.paged_decode_attention, q, k_cache, v_cache, block_tables, context_lens, scale,
                          num_splits, min_tokens_per_split, window, softcap)
    check_attention_options(window, softcap)
    check_cache(q, k_cache, v_cache)
    check_indices(block_tables=block_tables, context_lens=context_lens)
    batch, hq, dim = q.shape
    block_size, hkv = block_size_of(k_cache), k_cache.shape[2]
    if block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} / context_lens "
                         f"{tuple(context_lens.shape)} do not match batch {batch}")
    out = torch.empty_like(q)
    if batch == 0:
        return out
    # the kernels read index tensors at unit stride (.contiguous() is the tensor itself when it already is)
    block_tables, context_lens = index_rows(block_tables), context_lens.contiguous()
    block_n = tile_size(dim, q.dtype)
    max_context = max(block_tables.shape[1] * block_size, 1)
    if min_tokens_per_split < 1:
        raise ValueError(f"min_tokens_per_split must be >= 1, got {min_tokens_per_split}")
    if window is not None:  # a sequence reads at most its window
        max_context = min(max_context, window)
    if num_splits is None:  # the table width bounds every context, padded or not: a shape, never a value
        num_splits = pick_num_splits(batch, hkv, max_context, q.device, min_tokens_per_split)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    group = hq // hkv
    split = num_splits > 1
    if split:
        pm = torch.empty(batch, hq, num_splits, device=q.device, dtype=torch.float32)
        pl = torch.empty_like(pm)
        pacc = torch.empty(batch, hq, num_splits, dim, device=q.device, dtype=torch.float32)
    else:
        pm = pl = pacc = out  # unused when SPLIT is off
    tile_d = block_d(dim)
    _decode_kernel[(batch, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, pm, pl, pacc, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0), hq, group, dim, num_splits, min_tokens_per_split, window or 0,
        (softcap or 1.0) * LOG2E, BLOCK_SIZE=block_size, BLOCK_G=max(16, next_pow2(group)), BLOCK_N=block_n,
        BLOCK_D=tile_d, SPLIT=split, SLIDING=window is not None, SOFTCAP=softcap is not None,
        PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype), FP8=k_cache.dtype == FP8, COMPILED=not interpreting(),
        num_warps=4)
    if split:
        split_reduce_kernel[(batch, hq)](
            pm, pl, pacc, context_lens, out, out.stride(0), out.stride(1), hq, dim, num_splits,
            min_tokens_per_split, window or 0, BLOCK_S=next_pow2(num_splits), BLOCK_N=block_n, BLOCK_D=tile_d,
            SLIDING=window is not None)
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            max_seqlen_q: int, scale: float, *, window: int | None = None,
                            softcap: float | None = None) -> torch.Tensor:
    """Causal attention of the new tokens q [T, Hq, D] (varlen by cu_seqlens_q) over the paged cache; with a
    sliding ``window``, each token over its last ``window`` keys, its own included."""
    if torch.compiler.is_compiling():  # one opaque op when traced (rast_kernels.ops)
        from rast_kernels import ops
        return ops.traced(ops.paged_prefill_attention, q, k_cache, v_cache, block_tables, context_lens,
                          cu_seqlens_q, max_seqlen_q, scale, window, softcap)
    check_attention_options(window, softcap)
    check_cache(q, k_cache, v_cache)
    check_indices(block_tables=block_tables, context_lens=context_lens, cu_seqlens_q=cu_seqlens_q)
    total, hq, dim = q.shape
    block_size, hkv = block_size_of(k_cache), k_cache.shape[2]
    batch = context_lens.shape[0]
    if cu_seqlens_q.shape != (batch + 1,) or block_tables.shape[0] != batch:
        raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} / block_tables "
                         f"{tuple(block_tables.shape)} do not match {batch} sequences")
    out = torch.empty_like(q)
    if total == 0 or batch == 0 or max_seqlen_q <= 0:
        return out.zero_()
    block_tables, context_lens, cu_seqlens_q = index_rows(block_tables), context_lens.contiguous(), \
        cu_seqlens_q.contiguous()
    block_m = block_n = tile_size(dim, q.dtype)
    grid = (cdiv(max_seqlen_q, block_m), hq, batch)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, out, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0), hq // hkv, dim, window or 0, (softcap or 1.0) * LOG2E,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d(dim), SLIDING=window is not None,
        SOFTCAP=softcap is not None, PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype),
        FP8=k_cache.dtype == FP8, COMPILED=not interpreting(), num_warps=4, num_stages=2)
    return out
