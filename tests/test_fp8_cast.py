"""rast_kernels.fp8_cast.to_e4m3 against torch's own float8_e4m3fn conversion (the oracle), bit for bit:
every bfloat16 value, every float16 value, and the exact float32 midpoints between neighbouring e4m3
values (where round-to-nearest-even decides), with saturation at ±448 and NaN kept NaN; interpreted here,
compiled for sm_90 by test_attention_compile and natively under the gpu marker."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from rast_kernels.fp8_cast import to_e4m3

FP8 = torch.float8_e4m3fn
HAS_CUDA = torch.cuda.is_available()


@triton.jit
def _cast_kernel(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(o_ptr + i, to_e4m3(tl.load(x_ptr + i, mask=i < n)), mask=i < n)


def _cast(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=FP8, device=x.device)
    _cast_kernel[(triton.cdiv(x.numel(), 4096),)](x, out, x.numel(), BLOCK=4096)
    return out


def _midpoints() -> torch.Tensor:
    """float32: every e4m3 value, and the exact midpoint between each pair of neighbours, both signs."""
    grid = torch.arange(0, 0x7F, dtype=torch.uint8).view(FP8).float()  # 0 .. 448, every finite e4m3 >= 0
    mids = (grid[:-1].double() + grid[1:].double()) / 2  # exact in float32: 5 significant bits at most
    values = torch.cat([grid, mids.float(), torch.tensor([448.5, 464.0, 1e4, float("inf")])])
    return torch.cat([values, -values])


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.skipif(HAS_CUDA, reason="native on CUDA")),
                                    pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("source", ["bf16-all", "fp16-all", "fp32-midpoints"])
def test_to_e4m3_is_torchs_conversion_bit_for_bit(device: str, source: str) -> None:
    if source == "fp32-midpoints":
        x = _midpoints()
    else:
        x = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(
            torch.bfloat16 if source == "bf16-all" else torch.float16)
    got = _cast(x.to(device)).cpu()
    want = x.float().clamp(-448, 448).to(FP8)  # torch: nearest even, saturating
    nan = torch.isnan(x.float())
    assert torch.isnan(got[nan].float()).all()
    assert torch.equal(got[~nan].view(torch.uint8), want[~nan].view(torch.uint8))
