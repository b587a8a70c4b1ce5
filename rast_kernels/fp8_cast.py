"""float -> float8_e4m3fn inside Triton kernels, by integer arithmetic on the float32 bits.

Why not ``x.to(tl.float8e4nv)``: the GPU's conversion is right (round to nearest even, saturating), but
Triton's interpreter, which CI runs every kernel under, rounds ties away and drops the carry of a
rounded-up mantissa into the exponent (31.6 becomes 16), so an FP8 KV cache written that way could not
be tested on the CPU. This conversion is the same code on both, and equals torch's
``x.float().clamp(-448, 448).to(torch.float8_e4m3fn)`` bit for bit (tests/test_fp8_cast.py): round to
nearest even, saturated to ±448 (e4m3fn has no infinity), NaN to NaN, subnormals (|x| < 2^-6, steps of
2^-9) rounded by a float32 add. It costs a dozen integer ops an element, beside a store that is memory
bound.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn's largest finite value (it has no infinity)
E4M3_MAX = tl.constexpr(FP8_MAX)
MIN_NORMAL = tl.constexpr(0.015625)  # 2^-6: e4m3's smallest normal
# 2^14: adding it to |x| < 2^-6 rounds |x| to a multiple of 2^-9 (its float32 ulp), nearest even, and leaves
# the e4m3 subnormal mantissa (0..8; 8 is the smallest normal's encoding) in the low bits
DENORM_MAGIC = tl.constexpr(16384.0)


@triton.jit
def to_e4m3(x):
    """x (any float dtype) -> float8e4nv, round to nearest even, saturating."""
    f = x.to(tl.float32)
    nan = f != f
    a = tl.minimum(tl.abs(f), E4M3_MAX)
    bits = a.to(tl.int32, bitcast=True)
    sign = (f.to(tl.int32, bitcast=True) >> 24) & 0x80  # the float32 sign bit, moved to bit 7
    # normal: rebias the exponent (127 -> 7) and round the 23-bit mantissa to 3, nearest even; a carry
    # runs into the exponent as it should
    normal = (bits + ((7 - 127) << 23) + 0x7FFFF + ((bits >> 20) & 1)) >> 20
    sub = (a + DENORM_MAGIC).to(tl.int32, bitcast=True) - 0x46800000  # 0x46800000: 2^14's bits
    code = tl.where(a < MIN_NORMAL, sub, normal) | sign
    code = tl.where(nan, 0x7F, code)
    return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """The spec ``to_e4m3`` equals, in torch: nearest even, saturated at ±448."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as uint8 bytes when it is float8 (CPU torch has no float8 index_copy_), else ``t`` itself."""
    return t.view(torch.uint8) if t.dtype == FP8 else t
