"""The paged KV cache's store kernel, and the checks every kernel over a cache shares.

Layout (rast_engine.attention.metadata): k_cache, v_cache are [num_blocks, block_size, Hkv, D], token j
of a sequence at block ``block_tables[b, j // block_size]``, row ``j % block_size``; an FP8 cache has R
rows of scale exponents after each block's values (rast_kernels.fp8_kv). One program per new token
copies its [Hkv, D] key and value rows to its slot; slot -1 (CUDA-graph padding, or tokens that must not
be cached) stores nothing. Bytes: the rows read and written once, the floor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rast_kernels.fp8_cast import FP8
from rast_kernels.fp8_kv import block_size_of, exponent_byte, exponent_offset, quantize, row_exponent
from rast_kernels.launch import next_pow2, require_launchable

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_cr, stride_ch, num_kv_heads, head_dim,
                     BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    h = heads[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    head_live = (heads < num_kv_heads) & ((tl.zeros([BLOCK_H], tl.int64) + slot) >= 0)  # tensors: the
    mask = head_live[:, None] & (d < head_dim)  # interpreter rejects scalar masks
    slot = tl.where(slot >= 0, slot, 0)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cr + h * stride_ch + d
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask, other=0.0)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask, other=0.0)
    if FP8:  # each head's row scaled by its own power of two (rast_kernels.fp8_kv)
        k_exp, v_exp = row_exponent(k, 1), row_exponent(v, 1)
        tl.store(kc_ptr + dst, quantize(k, k_exp[:, None]), mask=mask)
        tl.store(vc_ptr + dst, quantize(v, v_exp[:, None]), mask=mask)
        at = exponent_offset(slot // BLOCK_SIZE, slot % BLOCK_SIZE, stride_cb, stride_cr, head_dim, BLOCK_SIZE)
        tl.store(kc_ptr + at + heads * stride_ch, exponent_byte(k_exp), mask=head_live)
        tl.store(vc_ptr + at + heads * stride_ch, exponent_byte(v_exp), mask=head_live)
    else:
        tl.store(kc_ptr + dst, k, mask=mask)
        tl.store(vc_ptr + dst, v, mask=mask)


def check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """q (or this step's k) fits the paged caches: dtypes, strides, heads and head_dim."""
    require_launchable(q, "Triton attention")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache/v_cache must be equal-strided [num_blocks, block_size, Hkv, D], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if q.dtype not in DTYPES or k_cache.dtype not in (q.dtype, FP8) or v_cache.dtype != k_cache.dtype:
        raise TypeError(f"q must be one of {DTYPES} and the caches q's dtype or {FP8}, both alike; got {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("q and the caches must be contiguous along head_dim")
    hq, hkv = q.shape[-2], k_cache.shape[2]
    if q.shape[-1] != k_cache.shape[3] or hq % hkv != 0:
        raise ValueError(f"q [.., {hq}, {q.shape[-1]}] does not fit a cache with {hkv} KV heads "
                         f"of dim {k_cache.shape[3]}")


def check_indices(**tensors: torch.Tensor) -> None:
    """Slot mappings, block tables, context lengths and offsets are int32 or int64: a float one would be
    truncated on the device, a bool one read as 0 and 1."""
    for name, t in tensors.items():
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")


def index_rows(block_tables: torch.Tensor) -> torch.Tensor:
    """The block table as the kernels index it: rows at any stride, entries adjacent. A row-sliced view
    (the engine's tables are a wider buffer's first columns) passes as it is; only another layout is copied."""
    return block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()


def block_d(dim: int) -> int:
    return max(16, next_pow2(dim))  # tl.dot needs every side >= 16


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write k, v [T, Hkv, D] into the paged caches at ``slot_mapping`` [T]; slot -1 is skipped. An FP8
    cache takes each (token, head) row quantised with its own power-of-two scale (rast_kernels.fp8_kv)."""
    if torch.compiler.is_compiling():  # one opaque op when traced (rast_kernels.ops)
        from rast_kernels import ops
        return ops.traced(ops.store_kv_cache, k, v, k_cache, v_cache, slot_mapping)
    check_cache(k, k_cache, v_cache)
    check_indices(slot_mapping=slot_mapping)
    if v.dtype != k.dtype:  # a wider v would be narrowed into the cache unchecked (float32 -> fp16 inf)
        raise TypeError(f"v must have k's dtype {k.dtype}, got {v.dtype}")
    if k.shape != v.shape or k.dim() != 3 or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"k, v must be [T, Hkv, D] matching the cache, got {tuple(k.shape)}, {tuple(v.shape)}")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [T={k.shape[0]}], got {tuple(slot_mapping.shape)}")
    if v.stride(-1) != 1:
        raise ValueError("k and v must be contiguous along head_dim")
    if k.shape[0] == 0:
        return
    hkv, dim = k.shape[1], k.shape[2]
    _store_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping.contiguous(), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), hkv, dim,
        BLOCK_SIZE=block_size_of(k_cache), BLOCK_H=next_pow2(hkv), BLOCK_D=block_d(dim), FP8=k_cache.dtype == FP8)
