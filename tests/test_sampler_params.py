"""Per-row sampling parameters on their way into the kernels: Python scalars and tensors mean the same,
out-of-range tensors are clamped the same way by every backend (the Triton one clamps in its first
kernel, the others through SamplingBatch), and a Triton call issues no device work besides its own
kernels. On CPU the Triton backend runs in the interpreter; the same tests run on CUDA under `gpu`."""
from __future__ import annotations

import pytest
import torch

import rast_kernels as rk
from device_ops import count_device_ops
from rast_kernels.batch import normalize

BACKENDS = [b for b in ("triton", "native") if b in rk.available_backends()]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
B, V = 4, 300


def _inputs(device: str, seed: int = 0) -> tuple[torch.Tensor, list]:
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, V, generator=gen) * 3).to(device)
    deltas = [(torch.randn(B, V + 3, generator=gen).to(device), torch.randn(B, V + 3, generator=gen).to(device))]
    return logits, deltas


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_tensors_are_clamped_like_the_reference(backend: str, device: str) -> None:
    if backend == "native" and device == "cuda":
        pytest.skip("the native backend is CPU only")
    logits, deltas = _inputs(device)
    kw = dict(temperature=torch.tensor([-1.0, 0.7, 2.0, 1.0], device=device),
              top_k=torch.tensor([2**40, -3, 5, 0], device=device),  # int64: clamped to [0, V], then int32
              top_p=torch.tensor([1.5, -0.2, 0.8, 0.0], device=device),
              min_p=torch.tensor([-0.5, 0.1, 2.0, 0.05], device=device))
    got = rk.rast_probs(logits, deltas, backend=backend, **kw)
    want = rk.rast_probs(logits, deltas, backend="torch", **kw)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the same rows written in range by hand: what the clamps must amount to
    inrange = dict(temperature=torch.tensor([0.0, 0.7, 2.0, 1.0], device=device),
                   top_k=torch.tensor([0, 0, 5, 0], dtype=torch.int32, device=device),
                   top_p=torch.tensor([1.0, 1.1754943508222875e-38, 0.8, 1.1754943508222875e-38], device=device),
                   min_p=torch.tensor([0.0, 0.1, 1.0, 0.05], device=device))
    torch.testing.assert_close(got, rk.rast_probs(logits, deltas, backend="torch", **inrange), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_scalars_and_tensors_mean_the_same(backend: str, device: str) -> None:
    if backend == "native" and device == "cuda":
        pytest.skip("the native backend is CPU only")
    logits, deltas = _inputs(device, seed=1)
    scalars = dict(weights=0.6, temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, seed=7, offset=3)
    tensors = dict(weights=torch.full((B, 1), 0.6, device=device), temperature=torch.full((B,), 0.9, device=device),
                   top_k=torch.full((B,), 40, dtype=torch.int32, device=device),
                   top_p=torch.full((B,), 0.9, device=device), min_p=torch.full((B,), 0.02, device=device),
                   seed=torch.full((B,), 7, device=device), offset=torch.full((B,), 3, device=device))
    for name in scalars:  # each parameter alone as a tensor, the others scalars
        mixed = dict(scalars, **{name: tensors[name]})
        assert torch.equal(rk.rast_sample(logits, deltas, backend=backend, **mixed),
                           rk.rast_sample(logits, deltas, backend=backend, **scalars)), name
    probs = {k: v for k, v in scalars.items() if k not in ("seed", "offset")}
    torch.testing.assert_close(rk.rast_probs(logits, deltas, backend=backend, **probs),
                               rk.rast_probs(logits, deltas, backend="torch", **probs), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN arithmetic, interpreted
def test_a_nan_parameter_empties_its_row_and_wide_top_k_tensors_do_not_wrap(backend: str, device: str) -> None:
    """A scalar NaN is refused (ValueError); a tensor cannot be checked without a host sync, so a NaN row
    admits nothing in every backend (-1, zero probabilities) instead of a backend-dependent guess (the
    native one used to sample it unfiltered). An int64 top_k of 2**32 + 3 means off, as the scalar does,
    not top-3 after wrapping to int32."""
    if backend == "native" and device == "cuda":
        pytest.skip("the native backend is CPU only")
    logits, deltas = _inputs(device, seed=4)
    nan = float("nan")
    for name in ("temperature", "top_p", "min_p"):
        values = torch.tensor([nan, 0.5, 0.0 if name == "temperature" else 0.1, nan], device=device)
        ids = rk.rast_sample(logits, deltas, seed=3, backend=backend, **{name: values})
        probs = rk.rast_probs(logits, deltas, backend=backend, **{name: values})
        assert ids[0] == ids[3] == -1 and bool((ids[1:3] >= 0).all()), name
        assert probs[[0, 3]].abs().sum() == 0 and torch.allclose(probs[1:3].sum(1), torch.ones(2, device=device))
        with pytest.raises(ValueError, match=name):
            rk.rast_sample(logits, deltas, backend=backend, **{name: nan})
    wide = torch.tensor([2**32 + 3, 0, -2**40, 3], device=device)
    got = rk.rast_probs(logits, deltas, top_k=wide, backend=backend)
    want = rk.rast_probs(logits, deltas, top_k=torch.tensor([0, 0, 0, 3], dtype=torch.int32, device=device),
                         backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_scalar_top_k_beyond_the_vocabulary_is_off_and_seeds_must_fit_int64() -> None:
    logits, deltas = _inputs("cpu", seed=2)
    off = rk.rast_probs(logits, deltas, top_k=0, top_p=0.9, backend="torch")
    for k in (V, 10**12, -5):  # k <= 0 and k >= V mean off; 10**12 would not fit the kernels' int32
        torch.testing.assert_close(rk.rast_probs(logits, deltas, top_k=k, top_p=0.9, backend="torch"), off)
    with pytest.raises(ValueError, match="seed must fit in int64"):
        rk.rast_sample(logits, deltas, seed=2**63, backend="torch")
    assert normalize(logits, deltas, top_k=10**12).params["top_k"].scalar == V


def test_other_integer_top_k_tensors_do_not_wrap_and_bool_tensors_are_refused() -> None:
    """A uint64 top_k of 2**32 + 3 is off, as the int64 one, not top-3 narrowed to int32; a bool tensor is
    refused for every parameter and the weights, as a Python bool is (a do-sample mask passed as
    temperature made its False rows greedy)."""
    logits, deltas = _inputs("cpu", seed=5)
    wide = torch.tensor([2**32 + 3, 0, 3, 2**63 + 7], dtype=torch.uint64)
    want = rk.rast_probs(logits, deltas, top_k=torch.tensor([0, 0, 3, 0], dtype=torch.int32), backend="torch")
    for backend in ("torch", *BACKENDS):
        torch.testing.assert_close(rk.rast_probs(logits, deltas, top_k=wide, backend=backend), want,
                                   rtol=1e-4, atol=1e-6)
    mask = torch.tensor([True, False, True, False])
    for name in ("temperature", "top_k", "top_p", "min_p", "seed", "offset"):
        with pytest.raises(TypeError, match=f"{name} must be a number tensor, got torch.bool"):
            rk.rast_sample(logits, deltas, backend="torch", **{name: mask})
    with pytest.raises(TypeError, match="weights must be a number tensor"):
        rk.rast_probs(logits, deltas, weights=torch.tensor([True]), backend="torch")


def test_backends_refuse_tensors_they_cannot_run_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clear error before any launch: triton on CPU tensors needs the interpreter (without it Triton
    itself fails with an unrelated driver error)."""
    from rast_kernels import launch

    logits, deltas = _inputs("cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        rk.rast_sample(logits, deltas, backend="cuda")
    monkeypatch.setattr(launch, "_INTERPRETING", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        rk.rast_sample(logits, deltas, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        rk.rast_probs(logits, deltas, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts interpreted launches (CPU only)")
def test_a_triton_call_is_its_four_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-row tensors of the engine's dtypes, or scalars with the seed a tensor (the benchmark's call):
    the parameters cost no device op (before: a clamp per float tensor, a fill per scalar); scalar
    weights cost one fill per pair."""
    logits, deltas = _inputs("cpu", seed=3)
    tensors = dict(weights=torch.full((B, 1), 0.5), temperature=torch.ones(B), top_k=torch.zeros(B, dtype=torch.int32),
                   top_p=torch.full((B,), 0.9), min_p=torch.zeros(B), seed=torch.arange(B),
                   offset=torch.zeros(B, dtype=torch.int64))
    scalars = dict(weights=0.5, temperature=1.0, top_p=0.9, seed=torch.arange(B))
    kernels = {"_stats": 1, "_select": 1, "_draw": 1, "_finish": 1}
    for kw, extra in ((tensors, {}), (scalars, {"fill_": 1})):
        with count_device_ops(monkeypatch) as ops:
            rk.rast_sample(logits, deltas, backend="triton", **kw)
        assert dict(ops) == {**kernels, **extra}
