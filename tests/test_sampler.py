"""rast_sample / rast_probs: the reference against a brute-force oracle, every backend against the
reference, sampled frequencies against rast_probs, and the edge cases of the spec. On CPU the Triton
backend runs in the interpreter, so shapes stay tiny; the same tests run on CUDA under `gpu`."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import rast_kernels as rk
from rast_kernels import reference
from rast_kernels.batch import normalize

BACKENDS = [b for b in ("torch", "triton", "native") if b in rk.available_backends()]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _usable(backend: str, device: str) -> None:
    if device == "cuda" and backend == "native":
        pytest.skip("the native backend is CPU only")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest, backend: str) -> str:
    _usable(backend, request.param)
    return request.param


def _logits(gen: torch.Generator, b: int, v: int, scale: float = 3.0, levels: int = 0) -> torch.Tensor:
    """Peaked random logits; levels > 0 rounds them onto a coarse grid to create many ties."""
    x = torch.randn(b, v, generator=gen) * scale
    return (x * levels).round() / levels if levels else x


def _case(gen: torch.Generator, b: int, v0: int, pairs: int, device: str, levels: int = 0):
    """Random (logits, deltas, per-row kwargs) with V0 != Vk and every parameter varying per row."""
    widths = [v0 + int(torch.randint(0, 5, (1,), generator=gen)) for _ in range(pairs)]
    logits = _logits(gen, b, v0, levels=levels).to(device)
    deltas = [(_logits(gen, b, w, 1.0, levels).to(device), _logits(gen, b, w, 1.0, levels).to(device))
              for w in widths]
    kw = dict(
        weights=(torch.rand(b, pairs, generator=gen) * 2 - 0.5).to(device),
        temperature=(torch.rand(b, generator=gen) * 1.5 + 0.3).to(device),
        top_k=torch.randint(0, v0 + 2, (b,), generator=gen, dtype=torch.int32).to(device),
        top_p=(torch.rand(b, generator=gen) * 0.9 + 0.1).to(device),
        min_p=(torch.rand(b, generator=gen) * 0.2).to(device),
    )
    return logits, deltas, kw


# ---------------------------------------------------------------- the reference vs a brute-force oracle

def _oracle_row(d: list[float], w: list[float], finite: list[bool], k: int, p: float, mp: float) -> list[bool]:
    """The spec read literally, by counting and exact summation (math.fsum), one token at a time."""
    n = len(d)
    f = [i for i in range(n) if finite[i]]
    keep_k = {i for i in f if k <= 0 or k >= n or sum(d[j] < d[i] for j in f) < k}
    total = math.fsum(w[j] for j in keep_k)
    keep_p = {i for i in keep_k if p >= 1 or math.fsum(w[j] for j in keep_k if d[j] < d[i]) < p * total}
    return [i in keep_p and w[i] >= mp for i in range(n)]


@pytest.mark.parametrize("levels", [0, 2])
def test_reference_matches_bruteforce_oracle(levels: int) -> None:
    gen = torch.Generator().manual_seed(1 + levels)
    for _ in range(40):
        b, v = 6, int(torch.randint(1, 12, (1,), generator=gen))
        logits, deltas, kw = _case(gen, b, v, int(torch.randint(0, 3, (1,), generator=gen)), "cpu", levels)
        logits[0, 0] = float("nan") if v > 1 else logits[0, 0]
        batch = normalize(logits, deltas, **kw)
        _, finite, d = reference.distances(batch)
        allowed, w = reference.admissible(batch)
        for r in range(b):
            want = _oracle_row(d[r].tolist(), w[r].tolist(), finite[r].tolist(), int(kw["top_k"][r]),
                               float(kw["top_p"][r]), float(kw["min_p"][r]))
            assert allowed[r].tolist() == want, f"row {r}: d={d[r].tolist()} params={[kw[x][r] for x in kw]}"


def test_combine_matches_numpy() -> None:
    gen = torch.Generator().manual_seed(3)
    logits, deltas, kw = _case(gen, 4, 9, 2, "cpu")
    z = reference.combine(normalize(logits, deltas, **kw))
    w = kw["weights"].numpy()
    want = logits.numpy().astype(np.float64)
    for k, (rl, base) in enumerate(deltas):
        want = want + w[:, k:k + 1] * (rl[:, :9].numpy() - base[:, :9].numpy())
    np.testing.assert_allclose(z.numpy(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- every backend vs the reference

@pytest.mark.parametrize("pairs", [0, 1, 2])
def test_probs_match_reference(backend: str, device: str, pairs: int) -> None:
    gen = torch.Generator().manual_seed(10 + pairs)
    for v0 in (7, 300):
        logits, deltas, kw = _case(gen, 5, v0, pairs, device)
        got = rk.rast_probs(logits, deltas, backend=backend, **kw)
        want = rk.rast_probs(logits, deltas, backend="torch", **kw)
        assert got.shape == (5, min([v0] + [r.shape[1] for r, _ in deltas])) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        ids = rk.rast_sample(logits, deltas, backend=backend, seed=torch.arange(5, device=device), **kw)
        assert ids.dtype == torch.int64 and bool((want.gather(1, ids[:, None]) > 0).all())


@pytest.mark.parametrize("weights", [0.7, [0.5, -0.25], "k", "bk"])
def test_weight_forms(backend: str, device: str, weights: object) -> None:
    gen = torch.Generator().manual_seed(5)
    logits, deltas, _ = _case(gen, 3, 40, 2, device)
    if weights == "k":
        weights = torch.tensor([0.5, -0.25], device=device)
    elif weights == "bk":
        weights = torch.tensor([[0.5, -0.25], [1.0, 0.0], [0.0, 2.0]], device=device)
    got = rk.rast_probs(logits, deltas, weights=weights, top_p=0.9, backend=backend)
    w = torch.as_tensor(weights, device=device).float().expand(3, 2)
    z = logits.float() + sum(w[:, k:k + 1] * (r[:, :40] - b[:, :40]) for k, (r, b) in enumerate(deltas))
    want = rk.rast_probs(z, top_p=0.9, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_sample_matches_reference_tokens(backend: str, device: str) -> None:
    """Uniforms are bit-identical across backends; log() may differ in the last ulp, so a near-tie
    between two Gumbel scores may rarely resolve differently: require almost all rows to agree."""
    gen = torch.Generator().manual_seed(7)
    logits, deltas, kw = _case(gen, 32, 200, 1, device)
    seed = torch.randint(0, 2**62, (32,), generator=gen).to(device)
    got = rk.rast_sample(logits, deltas, seed=seed, offset=3, backend=backend, **kw)
    want = rk.rast_sample(logits, deltas, seed=seed, offset=3, backend="torch", **kw)
    assert (got == want).float().mean().item() >= 0.95


# ---------------------------------------------------------------- sampled frequencies vs rast_probs

@pytest.mark.parametrize("params", [dict(top_k=5, top_p=0.9, min_p=0.02, temperature=0.7), dict()])
def test_chi_square_against_probs(backend: str, device: str, params: dict) -> None:
    interpreted = backend == "triton" and device == "cpu"  # ~0.1 s per row in the interpreter
    if interpreted and not params:
        pytest.skip("the unfiltered draw is the filtered one with a wider set; one interpreted run suffices")
    gen = torch.Generator().manual_seed(11)
    v, n = (6, 160) if interpreted else (12, 4000)
    row = _logits(gen, 1, v, 1.0).to(device)
    delta = (_logits(gen, 1, v, 1.0).to(device), _logits(gen, 1, v, 1.0).to(device))
    p = rk.rast_probs(row, [delta], weights=0.5, backend=backend, **params)[0].double().cpu()
    rows = row.expand(n, v).contiguous()
    pair = [(delta[0].expand(n, v).contiguous(), delta[1].expand(n, v).contiguous())]
    seeds = torch.arange(n, device=device) * 7919
    ids = rk.rast_sample(rows, pair, weights=0.5, seed=seeds, offset=torch.arange(n, device=device) % 5,
                         backend=backend, **params).cpu()
    counts = torch.bincount(ids, minlength=v).double()
    assert counts[p == 0].sum() == 0, "a token of probability 0 was drawn"
    support = p > 0
    expected = p[support] / p[support].sum() * n  # float32 probs sum to 1 only within rounding
    chi2, pvalue = stats.chisquare(counts[support].numpy(), expected.numpy())
    assert pvalue > 1e-4, f"chi2={chi2:.1f} p={pvalue:.2e} counts={counts.tolist()} probs={p.tolist()}"


# ---------------------------------------------------------------- determinism and batch invariance

def test_batch_invariance(backend: str, device: str) -> None:
    gen = torch.Generator().manual_seed(12)
    logits, deltas, kw = _case(gen, 6, 90, 1, device)
    seed, offset = torch.arange(6, device=device) + 100, torch.arange(6, device=device) * 3
    full = rk.rast_sample(logits, deltas, seed=seed, offset=offset, backend=backend, **kw)
    again = rk.rast_sample(logits, deltas, seed=seed, offset=offset, backend=backend, **kw)
    assert torch.equal(full, again)
    perm = torch.tensor([3, 0, 5, 1, 4, 2], device=device)
    shuffled = rk.rast_sample(logits[perm], [(r[perm], b[perm]) for r, b in deltas], seed=seed[perm],
                              offset=offset[perm], backend=backend, **{k: x[perm] for k, x in kw.items()})
    assert torch.equal(shuffled, full[perm])
    for r in (0, 4):
        one = rk.rast_sample(logits[r:r + 1], [(a[r:r + 1], b[r:r + 1]) for a, b in deltas], seed=seed[r:r + 1],
                             offset=offset[r:r + 1], backend=backend, **{k: x[r:r + 1] for k, x in kw.items()})
        assert one.item() == full[r].item()


@pytest.mark.gpu
def test_batch_invariance_at_a_real_vocabulary_on_the_gpu() -> None:
    """Natively the launch plan (S chunks, CAP candidates) depends on the batch size, so the float32
    order of the mass sums does too (sampler_triton, known inexactness): LM-like RAST rows at Qwen2.5's
    vocabulary must still draw the same token alone, in small batches and among 256 rows."""
    from bench_runs import load_bench

    bench = load_bench("sampler.py")
    gen, rows, vocab, dev = torch.Generator().manual_seed(0), 256, 152064, torch.device("cuda")
    logits, (rl, base) = bench.lm_logits(rows, vocab, dev, gen), bench.rast_pair(rows, vocab, dev, gen)
    kw = dict(temperature=1.0, top_p=0.95, top_k=torch.tensor([0, 50], device=dev).repeat(rows // 2),
              min_p=torch.tensor([0.0, 0.0, 0.05, 0.05], device=dev).repeat(rows // 4),
              seed=torch.arange(rows, device=dev), offset=torch.full((rows,), 7, device=dev))

    def draw(sl: slice) -> torch.Tensor:
        return rk.rast_sample(logits[sl], [(rl[sl], base[sl])], backend="triton",
                              **{k: v[sl] if isinstance(v, torch.Tensor) else v for k, v in kw.items()})

    full = draw(slice(0, rows))
    for size in (1, 3, 32, 100):
        for start in (0, rows - size):
            assert torch.equal(draw(slice(start, start + size)), full[start:start + size]), (size, start)


# ---------------------------------------------------------------- edge cases

def test_greedy_ties_lowest_index(backend: str, device: str) -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 3.0], [5.0, 5.0, 5.0, 5.0, 5.0], [1.0, 2.0, 3.0, 4.0, 4.0]],
                          device=device)
    temperature = torch.tensor([0.0, 0.0, -1.0], device=device)
    ids = rk.rast_sample(logits, temperature=temperature, seed=torch.arange(3, device=device), backend=backend)
    assert ids.tolist() == [1, 0, 3]
    probs = rk.rast_probs(logits, temperature=temperature, backend=backend)
    assert probs.argmax(dim=1).tolist() == [1, 0, 3] and probs.sum(dim=1).tolist() == [1.0, 1.0, 1.0]


def test_non_finite_rows(backend: str, device: str) -> None:
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[nan, 1.0, inf, 2.0, 0.5, -inf],
                           [-inf] * 6,
                           [nan, nan, 0.0, nan, nan, nan],
                           [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], device=device)
    rl = torch.zeros(4, 6, device=device)
    rl[3, 5] = nan
    rl[3, 4] = -inf
    deltas = [(rl, torch.zeros(4, 6, device=device))]
    for temperature in (1.0, 0.0):
        probs = rk.rast_probs(logits, deltas, temperature=temperature, backend=backend)
        want = rk.rast_probs(logits, deltas, temperature=temperature, backend="torch")
        torch.testing.assert_close(probs, want, rtol=1e-5, atol=1e-7)
        assert probs[1].abs().sum() == 0 and probs[2, 2] == 1.0
        assert probs[0, [0, 2, 5]].abs().sum() == 0 and probs[3, 4:].abs().sum() == 0
        for s in range(8):
            ids = rk.rast_sample(logits, deltas, temperature=temperature, seed=s, backend=backend).tolist()
            assert ids[1] == -1 and ids[2] == 2 and ids[0] in (1, 3, 4) and ids[3] in (0, 1, 2, 3)


@pytest.mark.parametrize("temperature", [1e-30, 1e-6])
def test_tiny_temperature_is_the_mode(backend: str, device: str, temperature: float) -> None:
    gen = torch.Generator().manual_seed(13)
    logits = _logits(gen, 4, 50).to(device)
    mode = logits.argmax(dim=1)
    ids = rk.rast_sample(logits, temperature=temperature, seed=torch.arange(4, device=device), backend=backend)
    assert torch.equal(ids, mode)
    probs = rk.rast_probs(logits, temperature=temperature, top_p=0.5, backend=backend)
    assert torch.equal(probs.argmax(dim=1), mode) and bool((probs.amax(dim=1) == 1.0).all())


def test_infinite_and_subnormal_temperatures(backend: str, device: str) -> None:
    """A per-row T = inf (a Python scalar inf is refused) is clamped to float32's max, as in every backend:
    unclamped, 3e38 - (-3e38) overflows and inf / inf made d NaN, which emptied the torch reference's
    top-p row but not the Triton one's. A subnormal T overflows 1 / T, and the Triton sampler's candidate
    summary scales by log2(e) / T: neither may leak a NaN into the filters."""
    logits = torch.tensor([[3e38, -3e38, 0.0, 1.0, float("-inf"), 2.0],
                           [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], device=device)
    for t in (float("inf"), 1e-45):
        temperature = torch.full((2,), t, device=device)
        for kw in (dict(top_p=0.5), dict(top_k=3), dict(min_p=0.5), {}):
            probs = rk.rast_probs(logits, temperature=temperature, backend=backend, **kw)
            want = rk.rast_probs(logits, temperature=temperature, backend="torch", **kw)
            torch.testing.assert_close(probs, want, rtol=1e-6, atol=0.0)
            ids = rk.rast_sample(logits, temperature=temperature, seed=torch.arange(2, device=device),
                                 backend=backend, **kw)
            assert bool((want[torch.arange(2, device=device), ids] > 0).all()), (t, kw, ids)


def test_top_k_one_and_tiny_top_p(backend: str, device: str) -> None:
    gen = torch.Generator().manual_seed(14)
    logits = _logits(gen, 5, 70).to(device)
    logits[4, 9] = logits[4, 3] = logits[4].max() + 1  # a tie at the top survives both filters
    seeds = torch.arange(5, device=device)
    for kw in (dict(top_k=1), dict(top_p=1e-9), dict(top_p=torch.full((5,), 1e-30, device=device))):
        ids = rk.rast_sample(logits, seed=seeds, backend=backend, **kw)
        probs = rk.rast_probs(logits, backend=backend, **kw)
        assert torch.equal(ids[:4], logits[:4].argmax(dim=1)) and ids[4].item() in (3, 9)
        assert probs[4, 3] == probs[4, 9] == 0.5 and bool((probs[:4].amax(dim=1) == 1.0).all())


def test_bf16_and_fp16_inputs(backend: str, device: str) -> None:
    gen = torch.Generator().manual_seed(15)
    for dtype in (torch.bfloat16, torch.float16):
        logits, deltas, kw = _case(gen, 4, 120, 1, device)
        logits, deltas = logits.to(dtype), [(r.to(dtype), b.to(dtype)) for r, b in deltas]
        got = rk.rast_probs(logits, deltas, backend=backend, **kw)
        want = rk.rast_probs(logits.float(), [(r.float(), b.float()) for r, b in deltas], backend="torch", **kw)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_vocab_size_bounds_ids(backend: str, device: str) -> None:
    logits = torch.zeros(3, 20, device=device)
    logits[:, 15:] = 50.0  # all the mass sits beyond vocab_size
    ids = rk.rast_sample(logits, vocab_size=10, seed=torch.arange(3, device=device), backend=backend)
    assert bool(((ids >= 0) & (ids < 10)).all())
    assert rk.rast_probs(logits, vocab_size=10, backend=backend).shape == (3, 10)
