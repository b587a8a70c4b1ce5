"""How rast_kernels.layer_ops' kernels compute as torch does, bit for bit: a float32 value rounded to the
model dtype as a torch op on that dtype stores it, and SiLU by torch's CUDA formula (the interpreter's
numpy is exact already); GELU's tanh form by torch's formula, within an ulp of it (tanh's implementations
differ); tl.dot with bfloat16 inputs upcast where the interpreter would get them wrong. Shared by the kernels
as Triton device functions."""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _round(x, dtype: tl.constexpr):
    """float32 x rounded to nearest-even in the model dtype, kept in float32: what a torch op on ``dtype``
    tensors stores. bfloat16 rounds on the bits because the Triton interpreter truncates fp32 -> bf16
    (compiled code rounds to nearest-even); the result is exact in bf16, so the final cast is exact too."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _silu(x, COMPILED: tl.constexpr):
    """x / (1 + exp(-x)) as torch's CUDA SiLU computes it (full-precision expf, IEEE division); tl.exp
    and "/" would compile to ex2.approx and div.full, several ulp off. The interpreter (numpy) is exact."""
    if COMPILED:
        return tl.math.div_rn(x, 1.0 + libdevice.exp(-x))
    else:
        return x / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x, COMPILED: tl.constexpr):
    if COMPILED:
        return libdevice.tanh(x)
    else:  # the interpreter has no libdevice: tanh from exp, exact in numpy's float32 to an ulp
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _gelu_tanh(x, COMPILED: tl.constexpr):
    """0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))): torch's gelu(approximate="tanh"), Gemma's MLP."""
    return 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x), COMPILED))


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:  # the interpreter's tl.dot gets bfloat16 wrong (no numpy bf16): it sees float32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)
