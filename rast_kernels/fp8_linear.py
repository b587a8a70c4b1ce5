"""FP8 weight-only linear layers (W8A16): y = x @ (w8 · s)ᵀ + b with w8 float8_e4m3fn [N, K] and one
float32 scale per output channel, s [N].

Why: decoding at small batch reads every weight once a step, so its time is the weights' bytes over HBM
bandwidth. Stored in FP8 they are half of bf16's bytes, and a large base model (Qwen2.5-32B, 65.5 GB in
bf16) fits one 80 GB GPU beside a 7B pair. Activations stay in the model's dtype, so nothing about the
small models' logit difference changes.

Quantisation (``quantize_fp8``): per output channel, s = max|w_row| / 448 (e4m3's largest finite value),
w8 = round-to-nearest(w / s); an all-zero row gets s = 1. Every e4m3 value is exact in bf16 and fp16.

Kernel: one program per (BLOCK_M rows of x, BLOCK_N output channels). It walks K in BLOCK_K steps,
converts the weight tile to x's dtype in registers (exact) and accumulates tl.dot in float32; the
scale and bias are applied once at the end, so the result is Σ_k x·w8 (float32) · s + b, rounded to x's
dtype once. Bytes moved: N·K (the weights) + 4N (scales) + M·K·e·ceil(N / BLOCK_N) (x, from L2 after
the first tile) + M·N·e, so at decode batch sizes the weights' N·K is the floor.

Invariants: no host sync (grid from shapes only), so it captures into CUDA graphs; the output takes x's
dtype; the torch backend (``fp8_linear_torch``) is the executable spec.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from rast_kernels.fp8_cast import FP8, FP8_MAX, e4m3
from rast_kernels.launch import cdiv, interpreting, require_launchable, sm_count

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w8 [N, K] float8_e4m3fn, scale [N] float32) of weight [N, K], per output channel."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got shape {tuple(weight.shape)}")
    w = weight.float()
    absmax = w.abs().amax(dim=1)
    if not torch.isfinite(absmax).all():
        raise ValueError("weight holds NaN or inf: it cannot be quantised")
    # tested after the division: a float32 row whose largest |w| is below ~6e-43 divides to a scale of 0,
    # and 0 / 0 would store NaN weights; such a row quantises to zeros with scale 1
    scale = absmax / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return e4m3(w / scale[:, None]), scale


def dequantize_fp8(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [N, K]: the weight the layer computes with."""
    return w8.float() * scale[:, None]


def fp8_linear_torch(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The spec: (x @ w8ᵀ in float32) · scale + bias, in x's dtype."""
    out = torch.nn.functional.linear(x.float(), w8.float()) * scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@triton.jit
def _fp8_linear_kernel(x_ptr, w_ptr, s_ptr, b_ptr, o_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + (k0 + rk)[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn.to(tl.int64)[None, :] * stride_wn + (k0 + rk)[:, None],
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_N]: wᵀ's tile
        if UPCAST:  # the interpreter's tl.dot gets bfloat16 wrong (no numpy bf16): it sees float32
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
    acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(o_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def plan(m: int, n: int, dtype: torch.dtype, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps). Decode batches (m <= 64) take the fewest rows tl.dot allows
    and a strip of output channels narrow enough that at least two programs per SM stream the weights
    (a 3584-wide o_proj makes 56 programs of 64 channels, 224 of 16); longer K steps keep a narrow
    strip's loads 256 bytes long. Prefill-sized m takes square tiles. fp32 (tests) and the interpreter
    take small tiles. Untuned: bench/gemm.py's fp8 rows time it."""
    if interpreting() or dtype == torch.float32:
        return 16, 32, 32, 4
    if m > 64:
        return 128, 128, 64, 8
    bm, bn = (16 if m <= 16 else 32 if m <= 32 else 64), 64
    while bn > 16 and cdiv(m, bm) * cdiv(n, bn) < 2 * sms:
        bn //= 2
    return bm, bn, 256 if bn <= 32 else 128, 4


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
               backend: str = "triton") -> torch.Tensor:
    """x [..., K] @ (w8 · scale)ᵀ + bias -> [..., N] in x's dtype; ``backend``: "triton" or "torch"."""
    if torch.compiler.is_compiling():  # one opaque op when traced (rast_kernels.ops)
        from rast_kernels import ops
        return ops.traced(ops.fp8_linear, x, w8, scale, bias, backend)
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be one of {DTYPES}, got {x.dtype}")
    if w8.dtype != FP8 or w8.dim() != 2 or x.shape[-1] != w8.shape[1]:
        raise ValueError(f"w8 must be float8_e4m3fn [N, {x.shape[-1]}], got {w8.dtype} {tuple(w8.shape)}")
    n, k = w8.shape
    if scale.shape != (n,) or scale.dtype != torch.float32 or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"scale must be float32 [{n}] and bias [{n}], got {tuple(scale.shape)} {scale.dtype} "
                         f"and {None if bias is None else tuple(bias.shape)}")
    if backend == "torch":
        return fp8_linear_torch(x, w8, scale, bias)
    if backend != "triton":
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    require_launchable(x, "x")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w8 = w8 if w8.stride(-1) == 1 else w8.contiguous()
    scale, bias = scale.contiguous(), None if bias is None else bias.contiguous()  # read at unit stride
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    bm, bn, bk, warps = plan(m, n, x.dtype, sm_count(x.device))
    _fp8_linear_kernel[(cdiv(m, bm), cdiv(n, bn))](
        x2, w8, scale, bias if bias is not None else scale, out, m, n, k, x2.stride(0), w8.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        UPCAST=interpreting() and x.dtype == torch.bfloat16,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=3)
    return out.reshape(*lead, n)
