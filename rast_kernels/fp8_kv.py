"""The FP8 KV cache: float8_e4m3fn values with a power-of-two scale per (token, KV head).

Why scales: e4m3 saturates at ±448, and the keys of Qwen2-family models (their k_proj has a bias) run
far past it, so a cache that stores raw values (vLLM's kv_cache_dtype="fp8" without calibrated scales)
clips the largest key channels and attention degrades badly. Why per (token, head): each row's scale
comes from its own values as it is stored, so nothing is calibrated, nothing depends on the first
batch, and no later token can saturate. Why a power of two: scaling by 2^k is exact, so quantising is
one rounding (to e4m3) and dequantising none; the kernels and the torch spec below agree bit for bit,
and the scale is one byte, its exponent (E8M0, as in the MX formats). k is the smallest with
amax / 2^k <= 448, so a row's largest value lands in (224, 448]: e4m3's whole range, whose relative
step (2^-3) does not depend on the scale.

Layout: an FP8 cache is [num_blocks, block_size + R, Hkv, D] float8_e4m3fn with R = cdiv(block_size, D):
a block's block_size token rows of values, then R rows of exponent bytes. Token r's exponent for KV head
h is byte r % D of row block_size + r // D, head h, and holds k + 127 (k in [-126, 126]). Scales inside
the block move with it (copy-on-write, prefix caching), and every kernel, backend and torch.library op
keeps its (k_cache, v_cache) signature. Value rows stay 16-byte aligned, as the loads want.

Bytes: a block costs (block_size + R) / block_size of its values' (+6% at block_size 16); decode
attention reads D + 1 bytes a token and head (+0.8% at D = 128).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rast_kernels.fp8_cast import FP8, e4m3, to_e4m3

K_MIN, K_MAX = -126, 126  # 2^k and 2^-k both normal float32
_BIAS = 127
_MANT_448 = 0x600000  # 448 = 1.75 * 2^8: the mantissa bits of 1.75


@triton.jit
def row_exponent(x, AXIS: tl.constexpr):
    """k per row of x along AXIS: the smallest power of two with max |x| / 2^k <= 448 (NaNs ignored:
    they stay NaN in the codes), as an int32 in [-126, 126]."""
    a = tl.abs(x.to(tl.float32))
    bits = tl.max(tl.where(a == a, a, 0.0), AXIS).to(tl.int32, bitcast=True)
    k = (bits >> 23) - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)  # 135 = 127 + 8: amax's exponent - 8
    return tl.minimum(tl.maximum(k, -126), 126)


@triton.jit
def pow2(k):
    """2^k for int32 k in [-126, 127], exactly, from its float32 bits."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def quantize(x, k):
    """x / 2^k rounded to e4m3 (nearest even, saturating); k broadcast against x."""
    return to_e4m3(x.to(tl.float32) * pow2(-k))


@triton.jit
def exponent_byte(k):
    """k as the stored byte (k + 127), typed for a store through the cache's float8 pointer."""
    return (k + 127).to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def exponent_offset(page, row, stride_cb, stride_cr, head_dim, BLOCK_SIZE: tl.constexpr):
    """Where token ``row`` of block ``page`` keeps its exponent byte, from its KV head's first value."""
    return page * stride_cb + (BLOCK_SIZE + row // head_dim) * stride_cr + row % head_dim


@triton.jit
def load_scale(base, page, row, stride_cb, stride_cr, head_dim, mask, BLOCK_SIZE: tl.constexpr):
    """2^k, float32, of token ``row`` of block ``page`` (``base`` at its KV head); 1 where masked."""
    byte = tl.load(base + exponent_offset(page, row, stride_cb, stride_cr, head_dim, BLOCK_SIZE), mask=mask,
                   other=0.0)
    k = byte.to(tl.uint8, bitcast=True).to(tl.int32) - 127
    return pow2(tl.where(mask, k, 0))


def scale_rows(block_size: int, head_dim: int) -> int:
    """R: the rows after a block's values that hold its exponent bytes."""
    return -(-block_size // head_dim)


def cache_rows(block_size: int, head_dim: int, dtype: torch.dtype) -> int:
    """Rows per block of a cache of ``dtype``: block_size, plus R for FP8."""
    return block_size + (scale_rows(block_size, head_dim) if dtype == FP8 else 0)


def block_size_of(cache: torch.Tensor) -> int:
    """The token rows of a block of ``cache`` [num_blocks, rows, Hkv, D]: rows, less R for FP8 (rows =
    n + cdiv(n, D) has the one solution n = rows - cdiv(rows, D + 1))."""
    rows, dim = cache.shape[1], cache.shape[3]
    return rows - (-(-rows // (dim + 1))) if cache.dtype == FP8 else rows


def exponents(x: torch.Tensor) -> torch.Tensor:
    """The torch spec of ``row_exponent`` along x's last dim: int32 k per row."""
    a = x.float().abs()
    bits = torch.where(a.isnan(), 0.0, a).amax(-1).view(torch.int32)
    k = (bits >> 23) - (_BIAS + 8) + ((bits & 0x7FFFFF) > _MANT_448).int()
    return k.clamp(K_MIN, K_MAX)


def _pow2(k: torch.Tensor) -> torch.Tensor:
    return ((k.int() + _BIAS) << 23).view(torch.float32)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn [..., D], k int32 [...]) of x [..., D], one scale a row: what the kernels store."""
    k = exponents(x)
    return e4m3(x.float() * _pow2(-k)[..., None]), k


def dequantize_rows(codes: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """float32 codes * 2^k, exact."""
    return codes.float() * _pow2(k)[..., None]


def fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """x through the cache and back, in x's dtype: what attention over an FP8 cache reads."""
    return _readable(dequantize_rows(*quantize_rows(x)), x.dtype).to(x.dtype)


def _readable(values: torch.Tensor, into: torch.dtype | None) -> torch.Tensor:
    """Dequantised values as attention reads them in ``into``: float16's largest value, 65504, is stored as
    the code 256 * 2^8 = 65536, which is inf in float16, so they are clamped to its range there, as the
    Triton kernels do (paged_attention._fits)."""
    return values.clamp(-65504.0, 65504.0) if into == torch.float16 else values


def _exponent_index(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Flat byte offsets [len(slots), Hkv] of the slots' exponent bytes in a contiguous FP8 cache."""
    bs, dim = block_size_of(cache), cache.shape[3]
    rows = slots % bs
    base = (slots // bs) * cache.stride(0) + (bs + rows // dim) * cache.stride(1) + rows % dim
    return base[:, None] + torch.arange(cache.shape[2], device=cache.device) * cache.stride(2)


def write_slots(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """The torch store: rows [T, Hkv, D] at flat ``slots`` (all >= 0) of ``cache``, quantised if FP8."""
    bs = block_size_of(cache)
    flat = (slots // bs) * cache.shape[1] + slots % bs  # the slot's row among all blocks' rows
    if cache.dtype != FP8:
        cache.view(-1, *cache.shape[2:]).index_copy_(0, flat, rows.to(cache.dtype))
        return
    codes, k = quantize_rows(rows)
    raw = cache.view(torch.uint8)
    raw.view(-1, *cache.shape[2:]).index_copy_(0, flat, codes.view(torch.uint8))
    raw.view(-1).index_copy_(0, _exponent_index(cache, slots).flatten(), (k + _BIAS).to(torch.uint8).flatten())


def read_blocks(cache: torch.Tensor, blocks: torch.Tensor, into: torch.dtype | None = None) -> torch.Tensor:
    """The values of ``blocks`` [n], [n, block_size, Hkv, D]: as stored, or dequantised (float32) if FP8,
    within the range of ``into``, the dtype attention reads them in (see _readable)."""
    bs = block_size_of(cache)
    picked = cache[blocks]
    if cache.dtype != FP8:
        return picked
    n, _, heads, dim = picked.shape
    raw = picked.view(torch.uint8)[:, bs:].permute(0, 2, 1, 3).reshape(n, heads, -1)[:, :, :bs]
    return _readable(dequantize_rows(picked[:, :bs], raw.transpose(1, 2).int() - _BIAS), into)

