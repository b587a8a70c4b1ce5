"""Device functions shared by the Triton sampler's kernels: parameter loads, the combination z of the
inputs, the counter-based RNG, and the key order of z. The algorithm is in rast_kernels.sampler_triton."""
from __future__ import annotations

import triton
import triton.language as tl

BIG = tl.constexpr(2**31 - 1)  # "no index" and "no key": larger than any id and any finite-or-inf key
TINY = tl.constexpr(1.1754943508222875e-38)  # float32's smallest normal: top_p's lower bound (batch.TINY)
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)  # temperature's upper bound (batch.FLOAT32_MAX)


@triton.jit
def _param(ptr, row, value, PER_ROW: tl.constexpr, DTYPE: tl.constexpr):
    """A per-row parameter: element ``row`` of a tensor, or the scalar ``value`` every row shares."""
    if PER_ROW:
        return tl.load(ptr + row).to(DTYPE)
    else:
        return tl.zeros([], DTYPE) + value


@triton.jit
def _clamp(x, lo, hi):
    """torch.clamp's semantics, NaN included (it stays NaN)."""
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _add_pair(z, row, offs, mask, r_ptr, r_stride, b_ptr, b_stride, w_ptr, K: tl.constexpr, PAIRS: tl.constexpr):
    """z + w_K * (rl_K - base_K) for one block of tokens of one row."""
    w = tl.load(w_ptr + row * PAIRS + K)
    r = tl.load(r_ptr + row * r_stride + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row * b_stride + offs, mask=mask, other=0.0).to(tl.float32)
    return z + w * (r - b)


@triton.jit
def _z(row, offs, mask, l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr,
       PAIRS: tl.constexpr):
    """z for one block of tokens, accumulated pair by pair exactly as reference.combine does."""
    row = row.to(tl.int64)  # row * stride overflows int32 beyond 2**31 elements
    z = tl.load(l_ptr + row * l_stride + offs, mask=mask, other=0.0).to(tl.float32)
    if PAIRS > 0:
        z = _add_pair(z, row, offs, mask, r0, r0s, b0, b0s, w_ptr, 0, PAIRS)
    if PAIRS > 1:
        z = _add_pair(z, row, offs, mask, r1, r1s, b1, b1s, w_ptr, 1, PAIRS)
    if PAIRS > 2:
        z = _add_pair(z, row, offs, mask, r2, r2s, b2, b2s, w_ptr, 2, PAIRS)
    if PAIRS > 3:
        z = _add_pair(z, row, offs, mask, r3, r3s, b3, b3s, w_ptr, 3, PAIRS)
    return z


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (rast_kernels.rng.mix32); multiplications wrap modulo 2**32."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _row_key(seed, offset):
    """rast_kernels.rng.row_key for int64 scalars (two's complement words)."""
    k = _mix32((seed & 0xFFFFFFFF).to(tl.uint32) ^ 0x9E3779B9)
    k = _mix32(k ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    k = _mix32(k ^ (offset & 0xFFFFFFFF).to(tl.uint32))
    return _mix32(k ^ ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32))


@triton.jit
def _gumbel_score(offs, rkey, d):
    """g_i - d_i with g from the shared counter-based RNG (uniforms bit-identical to rng.py)."""
    bits = _mix32(_mix32(offs.to(tl.uint32) ^ rkey) + rkey)
    u = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23, see rng.py
    return -tl.log(-tl.log(u)) - d


@triton.jit
def _zkey(z):
    """float32 -> int32 in the same order (finite and +-inf; NaN never reaches it)."""
    bits = z.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
