"""The FP8 KV cache's quantisation spec (rast_kernels.fp8_kv) against float64 math: the scale rule, the
round trip's error bound, and the edge rows (zeros, NaN, infinities). The kernels are held to this spec
bit for bit by test_fp8_kv_cache."""
from __future__ import annotations

import torch

from rast_kernels.fp8_kv import dequantize_rows, exponents, fake_quantize, quantize_rows


def test_the_exponent_is_the_smallest_that_fits_448() -> None:
    """k = ceil(log2(max|x| / 448)) for maxima across float32's range, including 448 * 2^j and its float
    neighbours, where the rule turns."""
    g = torch.Generator().manual_seed(0)
    steps = torch.arange(-120, 115, dtype=torch.float64)
    edges = 448 * torch.exp2(steps)
    amax = torch.cat([edges, torch.nextafter(edges.float(), torch.tensor(float("inf"))).double(),
                      torch.nextafter(edges.float(), torch.tensor(0.0)).double(),
                      torch.exp2(torch.rand(2000, generator=g, dtype=torch.float64) * 220 - 110)]).float()
    rows = torch.rand(len(amax), 8, generator=g) * amax[:, None]
    rows[:, 3] = -amax  # the row's largest magnitude, negative
    want = torch.ceil(torch.log2(amax.double() / 448)).clamp(-126, 126).int()
    assert torch.equal(exponents(rows), want)


def test_round_trip_is_one_e4m3_rounding() -> None:
    """codes * 2^k recovers x within e4m3's half step: 2^-4 relative in the normal range, 2^-10 * 2^k
    absolute below it; the row's largest magnitude scales into (224, 448] (224 after rounding at worst)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=g) * torch.exp2(torch.randint(-40, 40, (512, 1), generator=g).float())
    codes, k = quantize_rows(x)
    back = dequantize_rows(codes, k)
    scale = torch.exp2(k.double())[:, None]
    bound = torch.maximum(x.double().abs() * 2.0 ** -4, 2.0 ** -10 * scale)
    assert bool(((back.double() - x.double()).abs() <= bound).all())
    top = x.double().abs().amax(-1) / scale[:, 0]
    assert bool(((top > 224) & (top <= 448)).all()) and bool(codes.float().abs().amax(-1).ge(224).all())
    assert torch.equal(fake_quantize(x), back)
    # float16's 65504 rounds up to the code 256 * 2^8 = 65536: read back within float16, as the kernels read it
    top16 = torch.tensor([[65504.0, -65504.0, 1.0]], dtype=torch.float16)
    assert torch.equal(fake_quantize(top16), torch.tensor([[65504.0, -65504.0, 1.0]], dtype=torch.float16))


def test_edge_rows() -> None:
    """A zero row stores zeros; NaN stays NaN in its own element and leaves its row's scale to the rest;
    an infinity saturates to the largest code."""
    x = torch.tensor([[0.0, 0.0, 0.0], [float("nan"), 3.0, -1.0], [float("inf"), 1.0, 0.5]])
    codes, k = quantize_rows(x)
    assert torch.equal(codes[0].float(), torch.zeros(3)) and int(k[0]) == -126
    assert codes[1, 0].float().isnan() and int(k[1]) == -7 and torch.equal(codes[1, 1:].float(), torch.tensor([384., -128.]))
    assert float(codes[2, 0].float()) == 448.0
