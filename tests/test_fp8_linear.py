"""rast_kernels.fp8_linear: FP8 weight-only linear layers. Oracles: torch's own float8_e4m3fn conversion
for the quantiser (the grid of representable values, round to nearest), and float64 math on the
dequantised weight for the layer, which every backend must match to float32 accumulation error (then
one rounding to the output dtype)."""
from __future__ import annotations

import pytest
import torch

from rast_kernels.fp8_linear import FP8, FP8_MAX, dequantize_fp8, fp8_linear, quantize_fp8

HAS_CUDA = torch.cuda.is_available()
_interp = pytest.mark.skipif(HAS_CUDA, reason="with CUDA the kernels compile natively instead")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CASES = [pytest.param("cpu", dt, id=f"interp-{name}", marks=_interp) for name, dt in DTYPES.items()]
CASES += [pytest.param("cuda", dt, id=f"cuda-{name}", marks=pytest.mark.gpu) for name, dt in DTYPES.items()]
SHAPES = [(1, 40, 24), (5, 96, 70), (33, 130, 64)]  # (M, N, K): none a multiple of every tile


def test_quantize_fp8_is_per_channel_round_to_nearest() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 50, generator=g) * torch.tensor([1e-3, 0.02, 1.0, 30.0, 0.0, 5.0])[:, None]
    w8, scale = quantize_fp8(w.to(torch.bfloat16))
    assert w8.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (6,)
    assert scale[4] == 1.0 and (w8[4].float() == 0).all()  # an all-zero row
    absmax = w.to(torch.bfloat16).float().abs().amax(1)
    for r in (0, 1, 2, 3, 5):
        assert scale[r] == absmax[r] / FP8_MAX
        assert w8[r].float().abs().max() == FP8_MAX  # the largest entry lands on e4m3's largest value
        want = (w.to(torch.bfloat16).float()[r] / scale[r]).to(FP8)  # torch's own rounding to e4m3
        assert torch.equal(w8[r].view(torch.uint8), want.view(torch.uint8))
    # e4m3 keeps 3 mantissa bits: every entry within half a unit of its binade, relative 2^-4
    err = (dequantize_fp8(w8, scale) - w.to(torch.bfloat16).float()).abs()
    assert (err <= w.to(torch.bfloat16).float().abs() * 2 ** -4 + scale[:, None] * 2 ** -9).all()
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_fp8(torch.tensor([[1.0, float("nan")]]))
    # a float32 row so small that absmax / 448 underflows to 0 quantises to zeros, not 0 / 0 = NaN
    w8, scale = quantize_fp8(torch.tensor([[2e-43, 0.0, -1e-44], [1.0, 0.5, 0.0]]))
    assert scale[0] == 1.0 and (w8[0].float() == 0).all() and torch.isfinite(dequantize_fp8(w8, scale)).all()


@pytest.mark.parametrize("device, dtype", CASES)
@pytest.mark.parametrize("m, n, k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_matches_the_dequantised_weight(device: str, dtype: torch.dtype, m: int, n: int, k: int,
                                                    bias: bool) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    w8, scale = quantize_fp8(torch.randn(n, k, generator=g) * 0.05)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None
    want = x.double() @ dequantize_fp8(w8, scale).double().t() + (b.double() if bias else 0)
    w8, scale, xd = w8.to(device), scale.to(device), x.to(device)
    bd = None if b is None else b.to(device)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else \
        dict(atol=2e-3, rtol=torch.finfo(dtype).eps)  # one rounding to the output dtype
    for backend in ("torch", "triton"):
        got = fp8_linear(xd, w8, scale, bd, backend=backend)
        assert got.dtype == dtype and got.shape == (m, n)
        torch.testing.assert_close(got.double().cpu(), want.to(dtype).double(), **tol, msg=backend)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=_interp), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp8_linear_takes_leading_dims_and_strided_rows(device: str) -> None:
    g = torch.Generator().manual_seed(3)
    w8, scale = (t.to(device) for t in quantize_fp8(torch.randn(24, 16, generator=g)))
    x = torch.randn(2, 3, 32, generator=g).to(device)[..., ::2]  # [2, 3, 16], last dim strided
    got = fp8_linear(x, w8, scale)
    torch.testing.assert_close(got, fp8_linear(x.contiguous(), w8, scale, backend="torch"), atol=1e-5, rtol=1e-5)
    assert got.shape == (2, 3, 24)
    assert fp8_linear(x[:0], w8, scale).shape == (0, 3, 24)


def test_fp8_linear_refuses_what_it_cannot_compute() -> None:
    w8, scale = quantize_fp8(torch.randn(8, 4))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_linear(torch.randn(2, 4), w8.float(), scale)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_linear(torch.randn(2, 5), w8, scale)
    with pytest.raises(ValueError, match="scale"):
        fp8_linear(torch.randn(2, 4), w8, scale[:4])
    with pytest.raises(ValueError, match="x must be"):
        fp8_linear(torch.randn(2, 4).to(torch.float64), w8, scale)
    with pytest.raises(ValueError, match="backend"):
        fp8_linear(torch.randn(2, 4), w8, scale, backend="cuda")


@_interp
def test_fp8_linear_passes_opcheck_and_compiles_as_one_op() -> None:
    from rast_kernels import ops

    g = torch.Generator().manual_seed(5)
    w8, scale = quantize_fp8(torch.randn(24, 16, generator=g))
    x, bias = torch.randn(3, 16, generator=g), torch.randn(24, generator=g)
    before = [t.view(torch.uint8).clone() if t.dtype == FP8 else t.clone() for t in (x, w8, scale, bias)]
    for backend in ("torch", "triton"):
        # opcheck's test_schema (declared mutations) compares inputs with an op CPU float8 lacks: the
        # inputs are compared here instead, byte for byte
        torch.library.opcheck(ops.fp8_linear, (x, w8, scale, bias, backend),
                              test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))
        out = ops.fp8_linear(x, w8, scale, bias, backend)
        after = [t.view(torch.uint8) if t.dtype == FP8 else t for t in (x, w8, scale, bias)]
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert out.untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr() for t in (x, w8, scale, bias)}
    compiled = torch.compile(lambda t: fp8_linear(t, w8, scale, bias) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), fp8_linear(x, w8, scale, bias) * 2)
