"""LoRA deltas for adapters chosen per token, reading only the adapters the tokens use (the gathered idea of
punica's BGMV/SGMV kernels, here over the slot layout of rast_engine's multi-adapter models):

    y[t] += round(x[t] · A_sᵀ) · B_sᵀ,   s = slots[t]   (no delta where s is outside [0, S)).

Layout: ``lora_a`` [S·W, K] and ``lora_b`` [N, S·W] hold S slots of W = P·R columns each, for a projection
fused from P parts (q/k/v: 3, gate/up: 2, else 1) whose part p is output rows [starts[p], starts[p+1]).
Slot s, part p holds its adapter's A rows at columns s·W + p·R + [0, R), and B's block for that part's
rows at the same columns. B is block diagonal within a slot: rows of part p are read only at part p's
columns, so the spec ignores whatever the other blocks hold, and a step reads, per slot some token uses,
W·K of A and N·R of B, never the slots no token uses. A dense product over every slot (the engine's torch
path) reads S·W·(K + N) whatever the batch.

Algorithm (device ops only, no host sync, so it captures into a CUDA graph with the slots in a static
buffer):
1. shrink: a program per (BLOCK_T tokens, BLOCK_J columns of a slot, K split) loops over the slots, skips
   any no token of its tile uses, and multiplies the tile's rows of that slot by its A columns; the float32
   partial sums go to h [SPLIT, T, W]. Split-K keeps B = 1 from running on three programs.
2. expand: a program per (BLOCK_T tokens, BLOCK_N output rows) sums the splits in a fixed order, rounds h to
   the model dtype (what PEFT's lora_B(lora_A(x)) and the engine's torch path round), multiplies each used
   slot's diagonal block of B (the rank in chunks of at most 64, which keeps a rank-256 slot in registers)
   and writes y + delta rounded once; rows of no slot are left untouched.

A token's delta depends only on its own row, its slot and the tile shapes (batch size), never on the other
tokens' slots. Each tile of BLOCK_T (at most 64) tokens reads its used slots' weights itself: a decode batch
is one tile, and a prefill's tiles read a shared adapter again, from L2 where it fits.
``lora_slots_add_torch`` is the executable spec.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from rast_kernels.launch import cdiv, exact_fp_options, interpreting, next_pow2, require_launchable, sm_count
from rast_kernels.layer_ops_numerics import _dot, _round

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_PARTS = 3


def _shape(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor,
           max_loras: int, part_starts: Sequence[int]) -> tuple[int, int]:
    """(W, R) of the layout, or a ValueError naming what does not fit it."""
    if x.dtype not in DTYPES or x.dim() != 2 or y.dim() != 2 or y.dtype != x.dtype or y.shape[0] != x.shape[0]:
        raise ValueError(f"x [T, K] and y [T, N] must share one of {DTYPES} and T; got {x.dtype} {tuple(x.shape)} "
                         f"and {y.dtype} {tuple(y.shape)}")
    (t, k), n = x.shape, y.shape[1]
    if not isinstance(max_loras, int) or max_loras < 1 or lora_a.dim() != 2 or lora_a.shape[0] % max_loras:
        raise ValueError(f"lora_a must be [max_loras · W, K] for max_loras >= 1, got {tuple(lora_a.shape)} and "
                         f"max_loras={max_loras!r}")
    width, parts = lora_a.shape[0] // max_loras, len(part_starts)
    if not 1 <= parts <= MAX_PARTS or list(part_starts) != sorted(set(part_starts)) or part_starts[0] != 0 \
            or part_starts[-1] >= n:
        raise ValueError(f"part_starts must be 1 to {MAX_PARTS} ascending output rows from 0, below N = {n}; got "
                         f"{list(part_starts)}")
    if width % parts or width == 0:
        raise ValueError(f"a slot's {width} columns do not split into {parts} parts of one rank")
    if k == 0 or lora_a.shape[1] != k or lora_b.shape != (n, lora_a.shape[0]) \
            or {lora_a.dtype, lora_b.dtype} != {x.dtype}:
        raise ValueError(f"lora_a must be [S·W, {k}] and lora_b [{n}, S·W] in {x.dtype}; got {lora_a.dtype} "
                         f"{tuple(lora_a.shape)} and {lora_b.dtype} {tuple(lora_b.shape)}")
    if slots.shape != (t,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be int32 or int64 [{t}], got {slots.dtype} {tuple(slots.shape)}")
    return width, width // parts


def lora_slots_add_torch(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                         slots: torch.Tensor, max_loras: int, part_starts: Sequence[int]) -> torch.Tensor:
    """The spec: slot by slot and part by part, h in float32 rounded to the dtype, y + h·Bᵀ rounded once."""
    width, rank = _shape(y, x, lora_a, lora_b, slots, max_loras, part_starts)
    bounds = [*part_starts, y.shape[1]]
    for s in range(max_loras):
        rows = (slots == s).nonzero().flatten()
        if rows.numel() == 0:
            continue
        h = (x[rows].float() @ lora_a[s * width:(s + 1) * width].float().t()).to(x.dtype).float()
        delta = torch.zeros(rows.numel(), y.shape[1], dtype=torch.float32, device=y.device)
        for p, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            cols = slice(s * width + p * rank, s * width + (p + 1) * rank)
            delta[:, lo:hi] = h[:, p * rank:(p + 1) * rank] @ lora_b[lo:hi, cols].float().t()
        y[rows] = (y[rows].float() + delta).to(y.dtype)
    return y


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, slots_ptr, h_ptr, T, K, W, S, K_SPLIT, stride_x, stride_a,
                   BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr):
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rj = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    rk = tl.arange(0, BLOCK_K)
    t_ok = rt < T
    j_ok = rj < W
    slot = tl.load(slots_ptr + rt, mask=t_ok, other=-1)
    k_lo = tl.program_id(2) * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    acc = tl.zeros([BLOCK_T, BLOCK_J], tl.float32)
    for s in range(0, S):
        mine = slot == s
        if tl.max(mine.to(tl.int32), axis=0) > 0:  # a slot no token of the tile uses is never read
            cols = (s * W + rj).to(tl.int64)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                k_ok = (k0 + rk) < k_hi
                # other tokens' rows load as zeros: their share of this slot's product is exactly 0
                x = tl.load(x_ptr + rt.to(tl.int64)[:, None] * stride_x + (k0 + rk)[None, :],
                            mask=mine[:, None] & k_ok[None, :], other=0.0)
                a = tl.load(a_ptr + cols[None, :] * stride_a + (k0 + rk)[:, None],
                            mask=j_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_J]: Aᵀ's tile
                acc += _dot(x, a, UPCAST, PRECISION)
    tl.store(h_ptr + (tl.program_id(2) * T + rt).to(tl.int64)[:, None] * W + rj[None, :], acc,
             mask=t_ok[:, None] & j_ok[None, :])


@triton.jit
def _expand_kernel(h_ptr, b_ptr, slots_ptr, y_ptr, T, N, W, R, S, SPLIT, START1, START2, stride_b, stride_y,
                   PARTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    t_ok = rt < T
    n_ok = rn < N
    slot = tl.load(slots_ptr + rt, mask=t_ok, other=-1)
    part = (rn >= START1).to(tl.int32) + (rn >= START2).to(tl.int32)
    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    for s in range(0, S):
        mine = slot == s
        if tl.max(mine.to(tl.int32), axis=0) > 0:
            for p in tl.static_range(PARTS):
                rows = n_ok & (part == p)
                if tl.max(rows.to(tl.int32), axis=0) > 0:
                    for r0 in range(0, R, BLOCK_R):  # rank in chunks: a rank-256 slot spills no registers
                        r_ok = (r0 + rr) < R
                        h_at = h_ptr + rt.to(tl.int64)[:, None] * W + (p * R + r0 + rr)[None, :]
                        h_ok = mine[:, None] & r_ok[None, :]
                        h = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
                        for sp in range(0, SPLIT):  # a fixed order: the same sum on every run
                            h += tl.load(h_at + sp * T * W, mask=h_ok, other=0.0)
                        h = _round(h, y_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty)
                        b = tl.load(b_ptr + rn.to(tl.int64)[None, :] * stride_b + (s * W + p * R + r0 + rr)[:, None],
                                    mask=rows[None, :] & r_ok[:, None], other=0.0)  # [BLOCK_R, BLOCK_N]: Bᵀ's block
                        acc += _dot(h, b, UPCAST, PRECISION)
    at = y_ptr + rt.to(tl.int64)[:, None] * stride_y + rn[None, :]
    ok = (t_ok & (slot >= 0) & (slot < S))[:, None] & n_ok[None, :]  # rows of no slot keep their bits
    y = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    tl.store(at, _round(y + acc, y_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty), mask=ok)


def plan(tokens: int, width: int, rank: int, k: int, dtype: torch.dtype, sms: int
         ) -> tuple[int, int, int, int, int, int, int]:
    """(BLOCK_T, BLOCK_J, BLOCK_K, K_SPLIT, BLOCK_N, BLOCK_R, shrink warps): the fewest token rows tl.dot
    takes at decode; K split until the shrink's programs cover each SM twice (a split at least two K steps
    long); the rank in chunks of at most 64. The shrink's tiles compile for sm_90 without register spills,
    the expand's with a few bytes at most under some shapes (tests/test_lora_slots_compile.py). The
    interpreter and float32 (tests) take small tiles. Untuned: bench/lora_kernel.py times it."""
    small = interpreting() or dtype == torch.float32
    bt = 16 if tokens <= 16 or small else 32 if tokens <= 32 else 64
    bj = min(32 if small else 64, max(16, next_pow2(width)))
    bk = 32 if small else 64  # 128 at 16 tokens spilled 40 bytes a thread under Triton 3.6 (the GPU image's)
    tiles = cdiv(tokens, bt) * cdiv(width, bj)
    splits = max(1, min(cdiv(2 * sms, tiles), cdiv(k, 2 * bk)))
    k_split = cdiv(cdiv(k, splits), bk) * bk
    bn, br = (16, 16) if small else (64, min(64, max(16, next_pow2(rank))))
    return bt, bj, bk, k_split, bn, br, 8 if bt == 64 else 4


def lora_slots_add_(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    slots: torch.Tensor, max_loras: int, part_starts: Sequence[int],
                    backend: str = "triton") -> torch.Tensor:
    """y += each token's delta under its adapter slot (module docstring), in place; returns y. y may be a view
    of rows of a larger output (unit stride along N); ``backend``: "triton" or "torch"."""
    if torch.compiler.is_compiling():  # one opaque op when traced (rast_kernels.ops)
        from rast_kernels import ops
        ops.traced(ops.lora_slots_add, y, x, lora_a, lora_b, slots, max_loras, list(part_starts), backend)
        return y
    width, rank = _shape(y, x, lora_a, lora_b, slots, max_loras, part_starts)
    if backend == "torch":
        return lora_slots_add_torch(y, x, lora_a, lora_b, slots, max_loras, part_starts)
    if backend != "triton":
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    require_launchable(x, "x")
    (t, k), n = x.shape, y.shape[1]
    if t == 0:
        return y
    if y.stride(1) != 1:
        raise ValueError("y must have unit stride along its last dimension (it is written in place)")
    slots = slots if slots.stride(0) == 1 else slots.contiguous()  # the kernels read it at unit stride
    x = x if x.stride(1) == 1 else x.contiguous()
    lora_a = lora_a if lora_a.stride(1) == 1 else lora_a.contiguous()
    lora_b = lora_b if lora_b.stride(1) == 1 else lora_b.contiguous()
    bt, bj, bk, k_split, bn, br, warps = plan(t, width, rank, k, x.dtype, sm_count(x.device))
    splits = cdiv(k, k_split)
    h = torch.empty(splits, t, width, dtype=torch.float32, device=x.device)
    upcast, precision = interpreting() and x.dtype == torch.bfloat16, "ieee" if x.dtype == torch.float32 else "tf32"
    _shrink_kernel[(cdiv(t, bt), cdiv(width, bj), splits)](
        x, lora_a, slots, h, t, k, width, max_loras, k_split, x.stride(0), lora_a.stride(0),
        BLOCK_T=bt, BLOCK_J=bj, BLOCK_K=bk, UPCAST=upcast, PRECISION=precision, num_warps=warps,
        **exact_fp_options())
    starts = [*part_starts[1:], n, n]
    _expand_kernel[(cdiv(t, bt), cdiv(n, bn))](
        h, lora_b, slots, y, t, n, width, rank, max_loras, splits, starts[0], starts[1], lora_b.stride(0), y.stride(0),
        PARTS=len(part_starts), BLOCK_T=bt, BLOCK_N=bn, BLOCK_R=br, UPCAST=upcast, PRECISION=precision,
        num_warps=4, **exact_fp_options())
    return y
