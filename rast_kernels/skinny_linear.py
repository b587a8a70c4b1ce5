"""F.linear for a few rows: y = x Wᵀ + b with x [M, K], M <= MAX_ROWS (a decode step at batch 1 to 4).

Why: at decode batch sizes a projection reads its whole weight to make a few rows, so its time is the
weight's bytes over HBM bandwidth. In the first H100 profile (8759dcb, batch 1), the per-call times of
cuBLAS's GEMM kernels, matched by call count and size to Qwen2.5-7B's projections, come to about 1.4 to
2.4 TB/s against a 2989 GB/s copy (a reading of kernel names, not a per-projection measurement:
bench/gemm.py makes that one). This kernel gives every program a narrow strip of output channels, so
hundreds to thousands of programs stream the weight at once, each reading its strip's rows front to back.

Kernel: one program per BLOCK_N output channels. It walks K in BLOCK_K steps; each step loads the
[BLOCK_N, BLOCK_K] weight tile once and multiplies it by each of the M rows of x (constexpr, unrolled),
accumulating elementwise in float32 registers; the sums across K happen once, at the end, and bias is
added before the one rounding to x's dtype. Bytes moved: N·K·e (the weights, once) + M·K·e per program
(x, from L2) + M·N·e, so the weights are the floor.

Invariants: no host sync (grid from shapes only), so it captures into CUDA graphs; float32 accumulation,
so it differs from cuBLAS (also float32 accumulation, another order) by rounding alone; the output takes
x's dtype. Untuned: bench/gemm.py's "skinny" rows time it against F.linear on the same weights.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from rast_kernels.launch import cdiv, interpreting, require_launchable, sm_count

MAX_ROWS = 4
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# bytes of a weight tile: 16 bf16 weights a thread at 4 warps (2048 elements), 16 float32 accumulators a
# thread and row. float32 tiles are held to 2048 bytes and a K step of 128: at four rows, 2048 float32
# weights and a 256-wide step of x spilled 8-16 bytes a thread under Triton 3.6 (the GPU image's)
TILE_BYTES = 4096


@triton.jit
def _row(acc, w, x_ptr, row_at, k_at, k_ok, BLOCK_N: tl.constexpr):
    # x's row loaded as a [BLOCK_N, BLOCK_K] tile (each thread the columns of its own weights, from L1):
    # the same layout as w, so no shared-memory exchange and no barrier each step
    x = tl.load(x_ptr + row_at + k_at[None, :] + tl.zeros([BLOCK_N, 1], tl.int32), mask=k_ok[None, :], other=0.0)
    return acc + w * x.to(tl.float32)


@triton.jit
def _skinny_linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym,
                          M: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    # two weight tiles a step, both loaded before either is used: twice the bytes in flight per thread,
    # which is what hides HBM latency when a program's loop has nothing else to overlap
    for k0 in range(0, K, 2 * BLOCK_K):
        ka = k0 + rk
        kb = ka + BLOCK_K
        ka_ok, kb_ok = ka < K, kb < K
        wa = tl.load(w_rows + ka[None, :], mask=n_ok[:, None] & ka_ok[None, :], other=0.0).to(tl.float32)
        wb = tl.load(w_rows + kb[None, :], mask=n_ok[:, None] & kb_ok[None, :], other=0.0).to(tl.float32)
        acc0 = _row(_row(acc0, wa, x_ptr, 0, ka, ka_ok, BLOCK_N), wb, x_ptr, 0, kb, kb_ok, BLOCK_N)
        if M > 1:
            acc1 = _row(_row(acc1, wa, x_ptr, stride_xm, ka, ka_ok, BLOCK_N), wb, x_ptr, stride_xm, kb, kb_ok, BLOCK_N)
        if M > 2:
            acc2 = _row(_row(acc2, wa, x_ptr, 2 * stride_xm, ka, ka_ok, BLOCK_N), wb, x_ptr, 2 * stride_xm, kb, kb_ok,
                        BLOCK_N)
        if M > 3:
            acc3 = _row(_row(acc3, wa, x_ptr, 3 * stride_xm, ka, ka_ok, BLOCK_N), wb, x_ptr, 3 * stride_xm, kb, kb_ok,
                        BLOCK_N)
    bias = tl.zeros([BLOCK_N], tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    out_ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + rn, (tl.sum(acc0, axis=1) + bias).to(out_ty), mask=n_ok)
    if M > 1:
        tl.store(y_ptr + stride_ym + rn, (tl.sum(acc1, axis=1) + bias).to(out_ty), mask=n_ok)
    if M > 2:
        tl.store(y_ptr + 2 * stride_ym + rn, (tl.sum(acc2, axis=1) + bias).to(out_ty), mask=n_ok)
    if M > 3:
        tl.store(y_ptr + 3 * stride_ym + rn, (tl.sum(acc3, axis=1) + bias).to(out_ty), mask=n_ok)


def plan(n: int, k: int, sms: int, elt: int = 2) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): the widest strip (up to 16 channels) that still makes at least four
    programs per SM, its K step filling a TILE_BYTES tile of ``elt``-byte weights (float32: see TILE_BYTES).
    The interpreter takes small tiles."""
    if interpreting():  # few programs: the interpreter's cost is per program
        return 16, 64, 4
    bn = 16
    while bn > 2 and cdiv(n, bn) < 4 * sms:
        bn //= 2
    if elt > 2:  # float32: see TILE_BYTES
        return bn, max(64, min(TILE_BYTES // 2 // (bn * elt), 128, triton.next_power_of_2(k))), 4
    return bn, max(64, min(TILE_BYTES // (bn * elt), triton.next_power_of_2(k))), 4


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) @ weight [N, K]ᵀ + bias [N] -> [M, N] in x's dtype; CUDA tensors, or CPU
    tensors under TRITON_INTERPRET=1."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"x must be [M, K] with 1 <= M <= {MAX_ROWS}, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share one of {DTYPES}, got {x.dtype} and {weight.dtype}")
    n, k = weight.shape
    if weight.dim() != 2 or k != x.shape[1] or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"weight must be [N, {x.shape[1]}] and bias [N], got {tuple(weight.shape)} and "
                         f"{None if bias is None else tuple(bias.shape)}")
    require_launchable(x, "x")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    bn, bk, warps = plan(n, k, sm_count(x.device), x.element_size())
    _skinny_linear_kernel[(cdiv(n, bn),)](
        x, weight, bias if bias is not None else weight, out, n, k, x.stride(0), weight.stride(0), out.stride(0),
        M=x.shape[0], HAS_BIAS=bias is not None, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return out
