"""The decoder layer's elementwise work as one Triton kernel each: residual add + RMSNorm, rotary
embedding of q and k (optionally after Qwen3's RMSNorm of each head, and optionally writing k and v into
the paged KV cache in the same launch), SiLU-and-multiply (or Gemma's GELU-tanh-and-multiply).

Why: in plain PyTorch these are about 35 kernels per layer (a Qwen2 decode layer, counted; RMSNorm
alone is eight: casts, pow, mean, add, rsqrt, two muls). At decode batch 1 each kernel moves a few KB
and costs its launch latency, even inside a CUDA graph, so on a 28-layer model they add milliseconds to a step whose weight reads take
about five. Fused, a layer's non-GEMM, non-attention work is four kernels, the KV-cache store included
(six with OLMo's q/k norms over all heads or Gemma's norms after each sublayer).

Numerics are HF transformers' (Qwen2 / Qwen3 / Llama) op by op, not merely close: every intermediate that the
HF code rounds to the model dtype is rounded here too (``_round``, from layer_ops_numerics), float32 math
stays float32, and kernels compile without FMA contraction so a * b + c rounds twice, as two torch ops do. Compiled,
they also use torch's CUDA formulas where Triton's defaults are approximate (full-precision expf and
IEEE division in SiLU, the mean as sum * fp32(1/N)); interpreted, the CPU ones. What can still differ
is the RMSNorm sum's reduction order and rsqrt's last ulp, which may flip the rounding of an element
to the model dtype by one unit.

Shapes: token rows may be strided (views into a fused projection's output); the last dimension must be
contiguous. Outputs are new contiguous tensors, so nothing aliases an input; the only writes to
existing memory are the KV-cache slots of rotary_embedding_store_kv.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rast_kernels.fp8_kv import block_size_of, exponent_byte, exponent_offset, quantize, row_exponent
from rast_kernels.launch import cdiv, exact_fp_options, interpreting, next_pow2
from rast_kernels.layer_ops_checks import QKNorm, check_qk_norm, check_rotary, check_rows, check_store
from rast_kernels.layer_ops_numerics import _gelu_tanh, _round, _silu

__all__ = ["add_rms_norm", "gelu_tanh_and_mul", "rms_norm", "rotary_embedding", "rotary_embedding_store_kv",
           "silu_and_mul"]

@triton.jit
def _rms_norm_kernel(x_ptr, x_stride, r_ptr, r_stride, w_ptr, w_stride, group_rows, y_ptr, s_ptr, N, inv_n, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, COMPILED: tl.constexpr):
    """One row; its weight is row ``row // group_rows`` of w (w_stride 0: one weight for every row)."""
    row = tl.program_id(0).to(tl.int64)
    dtype = y_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # HF: hidden = residual + hidden, in the model dtype; that sum is the next residual
        r = tl.load(r_ptr + row * r_stride + offs, mask=mask, other=0.0).to(tl.float32)
        x = _round(x + r, dtype)
        tl.store(s_ptr + row * N + offs, x.to(dtype), mask=mask)
    sum_sq = tl.sum(x * x, axis=0)
    if COMPILED:  # torch's CUDA mean multiplies by fp32(1 / N); its CPU mean divides (the interpreter's oracle)
        mean_sq = sum_sq * inv_n
    else:
        mean_sq = sum_sq / N
    inv_rms = tl.math.rsqrt(mean_sq + eps)
    w = tl.load(w_ptr + (row // group_rows) * w_stride + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + offs, _round(w * _round(x * inv_rms, dtype), dtype).to(dtype), mask=mask)


@triton.jit
def _rotate_heads(x_ptr, t, h, d, mask, stride_t, stride_h, cos, sin, w_ptr, eps, inv_d, dtype: tl.constexpr,
                  HALF: tl.constexpr, QK_NORM: tl.constexpr, COMPILED: tl.constexpr):
    """Rotate-half RoPE of one token's heads h: (x1*cos - x2*sin, x2*cos + x1*sin) in the model dtype, each
    product and sum rounded as HF's q * cos + rotate_half(q) * sin rounds them. QK_NORM: each head is
    first RMS-normed over head_dim with the weight at w_ptr, as _rms_norm_kernel norms a row (Qwen3)."""
    src = x_ptr + t * stride_t + h * stride_h + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if QK_NORM:
        sum_sq = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
        if COMPILED:
            mean_sq = sum_sq * inv_d
        else:
            mean_sq = sum_sq / (2 * HALF)
        inv_rms = tl.math.rsqrt(mean_sq + eps)[:, None]
        w1 = tl.load(w_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
        x1 = _round(w1 * _round(x1 * inv_rms, dtype), dtype)
        x2 = _round(w2 * _round(x2 * inv_rms, dtype), dtype)
    lo = _round(_round(x1 * cos, dtype) - _round(x2 * sin, dtype), dtype).to(dtype)
    hi = _round(_round(x2 * cos, dtype) + _round(x1 * sin, dtype), dtype).to(dtype)
    return lo, hi


@triton.jit
def _rotary_kernel(q_ptr, q_stride_t, q_stride_h, k_ptr, k_stride_t, k_stride_h, pos_ptr, cs_ptr, cs_stride,
                   q_out, k_out, HQ, HK, Q_BLOCKS, v_ptr, v_stride_t, v_stride_h, kc_ptr, vc_ptr, slot_ptr,
                   c_stride_b, c_stride_r, c_stride_h, qw_ptr, kw_ptr, w_stride, group_tokens, eps, inv_d,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, STORE_KV: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, QK_NORM: tl.constexpr, COMPILED: tl.constexpr, FP8: tl.constexpr):
    """Grid (T, q head blocks + k head blocks): a program rotates BLOCK_H heads of one token, so the
    register tile stays small at 64 heads and a batch-1 step still spreads over several programs.
    STORE_KV: a k program also writes its rotated heads and the same heads of v into the paged caches at
    the token's slot (-1: not stored), the KV-cache store kernel folded into this one. QK_NORM: heads are
    normed first, token t's with row t // group_tokens of the q or k weight (w_stride 0: one weight)."""
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    dtype = q_out.dtype.element_ty
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    cos = tl.load(cs_ptr + pos * cs_stride + d, mask=d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * cs_stride + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    w_row = (t // group_tokens) * w_stride
    if j < Q_BLOCKS:
        h = j * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        mask = (h < HQ) & (d < HALF)
        lo, hi = _rotate_heads(q_ptr, t, h, d, mask, q_stride_t, q_stride_h, cos, sin, qw_ptr + w_row, eps, inv_d,
                               dtype, HALF, QK_NORM, COMPILED)
        dst = q_out + (t * HQ + h) * (2 * HALF) + d
    else:
        heads = (j - Q_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)
        h = heads[:, None]
        mask = (h < HK) & (d < HALF)
        lo, hi = _rotate_heads(k_ptr, t, h, d, mask, k_stride_t, k_stride_h, cos, sin, kw_ptr + w_row, eps, inv_d,
                               dtype, HALF, QK_NORM, COMPILED)
        dst = k_out + (t * HK + h) * (2 * HALF) + d
        if STORE_KV:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            head_live = (heads < HK) & ((tl.zeros([BLOCK_H], tl.int64) + slot) >= 0)  # the interpreter wants tensors
            live = mask & head_live[:, None]
            slot = tl.where(slot >= 0, slot, 0)
            row = (slot // BLOCK_SIZE) * c_stride_b + (slot % BLOCK_SIZE) * c_stride_r + h * c_stride_h + d
            v_src = v_ptr + t * v_stride_t + h * v_stride_h + d
            if FP8:  # each head's row scaled by its own power of two (rast_kernels.fp8_kv); masked lanes hold 0
                at = exponent_offset(slot // BLOCK_SIZE, slot % BLOCK_SIZE, c_stride_b, c_stride_r, 2 * HALF,
                                     BLOCK_SIZE) + heads * c_stride_h
                k_exp = tl.maximum(row_exponent(lo, 1), row_exponent(hi, 1))  # monotone: the whole row's
                tl.store(kc_ptr + row, quantize(lo, k_exp[:, None]), mask=live)
                tl.store(kc_ptr + row + HALF, quantize(hi, k_exp[:, None]), mask=live)
                tl.store(kc_ptr + at, exponent_byte(k_exp), mask=head_live)
                v_lo, v_hi = tl.load(v_src, mask=live, other=0.0), tl.load(v_src + HALF, mask=live, other=0.0)
                v_exp = tl.maximum(row_exponent(v_lo, 1), row_exponent(v_hi, 1))
                tl.store(vc_ptr + row, quantize(v_lo, v_exp[:, None]), mask=live)
                tl.store(vc_ptr + row + HALF, quantize(v_hi, v_exp[:, None]), mask=live)
                tl.store(vc_ptr + at, exponent_byte(v_exp), mask=head_live)
            else:
                v_lo, v_hi = tl.load(v_src, mask=live), tl.load(v_src + HALF, mask=live)
                tl.store(kc_ptr + row, lo, mask=live)
                tl.store(kc_ptr + row + HALF, hi, mask=live)
                tl.store(vc_ptr + row, v_lo, mask=live)
                tl.store(vc_ptr + row + HALF, v_hi, mask=live)
    tl.store(dst, lo, mask=mask)
    tl.store(dst + HALF, hi, mask=mask)


@triton.jit
def _act_mul_kernel(x_ptr, x_stride, y_ptr, N, BLOCK: tl.constexpr, COMPILED: tl.constexpr, GELU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    dtype = y_ptr.dtype.element_ty
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + N + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        act = _round(_gelu_tanh(gate, COMPILED), dtype)
    else:
        act = _round(_silu(gate, COMPILED), dtype)  # HF: act_fn(gate) * up, two roundings
    tl.store(y_ptr + row * N + offs, _round(act * up, dtype).to(dtype), mask=mask)


def _norm_launch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_rows("x", x)
    n = x.shape[1]
    groups = weight.shape[0] if weight.dim() == 2 else 1
    if (weight.shape[-1:] != (n,) or weight.dim() > 2 or weight.dtype != x.dtype or weight.device != x.device
            or weight.stride(-1) != 1 or x.shape[0] % groups):
        raise ValueError(f"weight must be [{n}] or [G, {n}] (G dividing the {x.shape[0]} rows), contiguous "
                         f"along {n}, of x's dtype and device; got {tuple(weight.shape)} {weight.dtype} on "
                         f"{weight.device} (stride {weight.stride()})")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = None
    if residual is not None:
        check_rows("residual", residual, n)
        if residual.shape[0] != x.shape[0] or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError("residual must match x in tokens, dtype and device")
        s = torch.empty_like(y)
    if x.shape[0]:
        block = next_pow2(n)
        r = x if residual is None else residual
        w_stride = weight.stride(0) if weight.dim() == 2 else 0
        _rms_norm_kernel[(x.shape[0],)](x, x.stride(0), r, r.stride(0), weight, w_stride, x.shape[0] // groups, y,
                                        y if s is None else s, n, 1.0 / n, float(eps),
                                        HAS_RESIDUAL=residual is not None, BLOCK=block, COMPILED=not interpreting(),
                                        num_warps=min(16, max(1, block // 512)), **exact_fp_options())
    return y, s


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[T, N] -> weight * x / rms(x), statistics in float32 and the product in x's dtype (HF's RMSNorm).
    weight is [N], or [G, N] for G models' rows stacked in x: G consecutive groups of T / G rows, group g
    normed with weight[g] (several small models run as one batch)."""
    if torch.compiler.is_compiling():  # one opaque op when traced (rast_kernels.ops)
        from rast_kernels import ops
        return ops.traced(ops.rms_norm, x, weight, eps)
    return _norm_launch(x, weight, eps, None)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """s = residual + x in x's dtype; returns (rms_norm(s), s): a decoder layer's residual step (weight
    as in rms_norm)."""
    if torch.compiler.is_compiling():
        from rast_kernels import ops
        return ops.traced(ops.add_rms_norm, x, residual, weight, eps)
    y, s = _norm_launch(x, weight, eps, residual)
    assert s is not None
    return y, s


def _rotary_launch(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor,
                   store: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
                   qk_norm: QKNorm | None) -> tuple[torch.Tensor, torch.Tensor]:
    check_qk_norm(q, qk_norm)
    t, hq, dim = q.shape
    hk = k.shape[1]
    q_out = torch.empty((t, hq, dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hk, dim), dtype=k.dtype, device=k.device)
    if not t:
        return q_out, k_out
    v, k_cache, v_cache, slots = store if store is not None else (k_out, k_out, k_out, positions)
    positions, slots = positions.contiguous(), slots.contiguous()  # the kernel reads both at unit stride
    cache_strides = k_cache.stride()[:3] if store is not None else (0, 0, 0)
    qw, kw, eps = qk_norm if qk_norm is not None else (q_out, k_out, 0.0)
    w_stride, group_tokens = (qw.stride(0), t // qw.shape[0]) if qk_norm is not None and qw.dim() == 2 else (0, 1)
    half, block_h = dim // 2, min(8, next_pow2(max(hq, hk)))
    q_blocks = cdiv(hq, block_h)
    _rotary_kernel[(t, q_blocks + cdiv(hk, block_h))](
        q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), positions, cos_sin, cos_sin.stride(0), q_out,
        k_out, hq, hk, q_blocks, v, v.stride(0), v.stride(1), k_cache, v_cache, slots, *cache_strides,
        qw, kw, w_stride, group_tokens, float(eps), 1.0 / dim,
        HALF=half, BLOCK_H=block_h, BLOCK_D=next_pow2(half), STORE_KV=store is not None,
        BLOCK_SIZE=block_size_of(k_cache) if store is not None else 1, QK_NORM=qk_norm is not None,
        FP8=store is not None and k_cache.dtype == torch.float8_e4m3fn,
        COMPILED=not interpreting(), num_warps=4, **exact_fp_options())
    return q_out, k_out


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor,
                     qk_norm: QKNorm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE. q: [T, Hq, D], k: [T, Hk, D] (heads may be strided views), positions: [T] int,
    cos_sin: [max_positions, D] = [cos | sin] in q's dtype. Returns new contiguous (q, k).
    ``qk_norm`` (Qwen3): each head of q and k is first RMS-normed over D, as rms_norm norms a row, with
    weights [D], or [G, D] for G models' tokens stacked in q (G consecutive groups of T / G tokens).
    Every position must be < max_positions: it is read on the device only (checking it on the host
    would sync), and the engine guarantees it by capping max_model_len at the table's length."""
    if torch.compiler.is_compiling():
        from rast_kernels import ops
        return ops.traced(ops.rotary_embedding, positions, q, k, cos_sin, *ops.split_qk_norm(qk_norm))
    check_rotary(positions, q, k, cos_sin)
    return _rotary_launch(positions, q, k, cos_sin, None, qk_norm)


def rotary_embedding_store_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor, qk_norm: QKNorm | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary_embedding, and in the same launch the rotated k and v [T, Hk, D] written into the paged
    caches [num_blocks, block_size, Hk, D] at ``slot_mapping`` [T] (slot -1 is skipped): what
    rotary_embedding followed by kv_store.store_kv_cache does, one kernel fewer per layer."""
    if torch.compiler.is_compiling():
        from rast_kernels import ops
        return ops.traced(ops.rotary_embedding_store_kv, positions, q, k, v, cos_sin, k_cache, v_cache,
                          slot_mapping, *ops.split_qk_norm(qk_norm))
    check_rotary(positions, q, k, cos_sin)
    check_store(k, v, k_cache, v_cache, slot_mapping)
    return _rotary_launch(positions, q, k, cos_sin, (v, k_cache, v_cache, slot_mapping), qk_norm)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2N] = [gate | up] -> silu(gate) * up, [T, N] (HF's MLP activation, rounded as HF rounds)."""
    if torch.compiler.is_compiling():
        from rast_kernels import ops
        return ops.traced(ops.silu_and_mul, gate_up)
    return _act_mul(gate_up, gelu=False)


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2N] = [gate | up] -> gelu_tanh(gate) * up, [T, N] (Gemma's MLP activation, rounded as HF rounds)."""
    if torch.compiler.is_compiling():
        from rast_kernels import ops
        return ops.traced(ops.gelu_tanh_and_mul, gate_up)
    return _act_mul(gate_up, gelu=True)


def _act_mul(gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
    check_rows("gate_up", gate_up)
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must have an even width [gate | up], got {gate_up.shape[1]}")
    t, n = gate_up.shape[0], gate_up.shape[1] // 2
    y = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    if t and n:
        block = min(1024, next_pow2(n))
        _act_mul_kernel[(t, cdiv(n, block))](gate_up, gate_up.stride(0), y, n, BLOCK=block,
                                             COMPILED=not interpreting(), GELU=gelu, num_warps=4, **exact_fp_options())
    return y
