"""The native CPU backend (CMakeLists.txt, rast_kernels/csrc) against the executable spec.

The oracle is rast_kernels.reference (itself checked against a brute-force oracle in test_sampler.py).
Native is fast, so these tests use wider vocabularies than the interpreter-bound Triton tests, plus
inputs built to stress the histogram-and-select threshold search: heavy ties, flat rows whose whole mass
sits in one bin, cuts in the open-ended last bin, mixed dtypes and strided rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import rast_kernels as rk
from rast_kernels import native

pytestmark = pytest.mark.skipif(not native.is_available(),
                                reason=f"native library not built: {native.unavailable_reason()}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(gen: torch.Generator, b: int, v0: int, pairs: int, dtype: torch.dtype, levels: int = 0,
          scale: float = 3.0):
    """Random logits/deltas (V0 != Vk) and per-row parameters; levels > 0 snaps values to a grid (ties)."""
    def mat(width: int, s: float) -> torch.Tensor:
        x = torch.randn(b, width, generator=gen) * s
        return ((x * levels).round() / levels if levels else x).to(dtype)

    logits = mat(v0, scale)
    deltas = [(mat(v0 + int(torch.randint(-3, 6, (1,), generator=gen)), 1.0), mat(v0 + 7, 1.0))
              for _ in range(pairs)]
    kw = dict(
        weights=torch.rand(b, pairs, generator=gen) * 2 - 0.5,
        temperature=torch.rand(b, generator=gen) * 1.5 + 0.3,
        top_k=torch.randint(0, v0 + 2, (b,), generator=gen, dtype=torch.int32),
        top_p=torch.rand(b, generator=gen) * 0.9 + 0.1,
        min_p=torch.rand(b, generator=gen) * 0.2,
    )
    return logits, deltas, kw


def _both_probs(logits, deltas, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    return (rk.rast_probs(logits, deltas, backend="native", **kw),
            rk.rast_probs(logits, deltas, backend="torch", **kw))


def _assert_same_distribution(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.equal(got > 0, want > 0), "the admissible sets differ"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pairs", [0, 1, 2])
@pytest.mark.parametrize("levels", [0, 2])
def test_probs_match_reference(dtype: torch.dtype, pairs: int, levels: int) -> None:
    gen = torch.Generator().manual_seed(100 * pairs + levels + len(str(dtype)))
    for v0 in (37, 1000, 5003):
        logits, deltas, kw = _case(gen, 12, v0, pairs, dtype, levels)
        _assert_same_distribution(*_both_probs(logits, deltas, **kw))


def test_mixed_dtypes_strided_rows_and_vocab_size() -> None:
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(6, 900, generator=gen) * 4
    logits = wide.to(torch.bfloat16)[:, 50:850]  # row stride 900, not V
    rl = torch.randn(6, 820, generator=gen)
    base = torch.randn(6, 810, generator=gen).to(torch.float16)
    assert logits.stride(0) != logits.shape[1]
    kw = dict(weights=[0.8], temperature=0.9, top_k=40, top_p=0.9, min_p=0.01, vocab_size=777)
    got, want = _both_probs(logits, [(rl, base)], **kw)
    assert got.shape == (6, 777)
    _assert_same_distribution(got, want)


@pytest.mark.parametrize("case", ["flat", "two_levels", "far_tail", "huge_spread"])
def test_threshold_search_stress(case: str) -> None:
    """Rows whose cut falls in a crowded bin, on a tie group, or in the open-ended last bin."""
    gen = torch.Generator().manual_seed(7)
    v = 4000
    if case == "flat":  # one tie group holds all the mass: top-p must keep all of it
        logits = torch.zeros(4, v)
    elif case == "two_levels":  # two big tie groups; the cut lands exactly on a group boundary
        logits = torch.where(torch.rand(4, v, generator=gen) < 0.3, 1.0, 0.0)
    elif case == "far_tail":  # a peaked head plus a large tail more than 32 nats down
        logits = torch.cat([torch.randn(4, 10, generator=gen), torch.randn(4, v - 10, generator=gen) - 40.0], 1)
    else:
        logits = torch.randn(4, v, generator=gen) * 60.0
    for top_p in (0.05, 0.5, 0.95, 0.999999):
        for top_k in (0, 1, 7, v - 1):
            got, want = _both_probs(logits, (), top_p=top_p, top_k=top_k, temperature=1.0)
            _assert_same_distribution(got, want)


def test_fp16_subnormals_widen_exactly() -> None:
    """At T = 2**-24 (the fp16 subnormal spacing) each subnormal step is one nat, so a widening error
    anywhere in the subnormal range changes the probabilities."""
    gen = torch.Generator().manual_seed(2)
    bits = torch.arange(1, 1024, dtype=torch.int16)
    row = torch.cat([bits, bits | -0x8000]).view(torch.float16)  # every nonzero subnormal, both signs
    logits = row[torch.randperm(row.numel(), generator=gen)][None, :]
    got, want = _both_probs(logits, [(logits.flip(1), logits)], weights=0.25, temperature=2.0**-24)
    _assert_same_distribution(got, want)
    assert int((got > 0).sum()) > 20


def test_full_qwen_vocab_matches_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    v = 152064
    logits = (torch.randn(2, v, generator=gen) * 2.5).to(torch.bfloat16)
    delta = (torch.randn(2, 151936, generator=gen), torch.randn(2, 151936, generator=gen))
    kw = dict(weights=0.5, temperature=torch.tensor([1.0, 0.7]), top_p=0.95,
              top_k=torch.tensor([0, 50], dtype=torch.int32), min_p=torch.tensor([0.0, 0.02]))
    _assert_same_distribution(*_both_probs(logits, [delta], **kw))
    seeds = torch.tensor([11, 12])
    assert torch.equal(rk.rast_sample(logits, [delta], seed=seeds, backend="native", **kw),
                       rk.rast_sample(logits, [delta], seed=seeds, backend="torch", **kw))


def test_samples_match_reference_tokens() -> None:
    """Same counter-based noise, same scores: draws agree except for float rounding at a threshold."""
    gen = torch.Generator().manual_seed(5)
    logits, deltas, kw = _case(gen, 16, 600, 1, torch.float32)
    agree = total = 0
    for seed in range(40):
        a = rk.rast_sample(logits, deltas, seed=seed, offset=seed * 3, backend="native", **kw)
        b = rk.rast_sample(logits, deltas, seed=seed, offset=seed * 3, backend="torch", **kw)
        agree += int((a == b).sum())
        total += a.numel()
    assert agree >= 0.99 * total


@pytest.mark.parametrize("params", [dict(), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.05, temperature=1.6)])
def test_chi_square_against_probs(params: dict) -> None:
    gen = torch.Generator().manual_seed(9)
    v, draws = 24, 6000
    row = torch.randn(1, v, generator=gen) * 1.5
    probs = rk.rast_probs(row, backend="native", **params)[0].double()
    ids = rk.rast_sample(row.expand(draws, v), seed=torch.arange(draws) + 1000, offset=17,
                         backend="native", **params)
    assert bool(((ids >= 0) & (probs[ids.clamp(min=0)] > 0)).all()), "drew a token outside A"
    support = probs > 0
    assert int(support.sum()) >= 4, "the case must leave a non-trivial distribution"
    counts = torch.bincount(ids, minlength=v).double()[support].numpy()
    expected = (probs[support] / probs[support].sum() * draws).numpy()  # float32 probs sum to 1 +- 1e-7
    assert stats.chisquare(counts, expected).pvalue > 1e-4


def test_the_largest_gumbel_noise_can_win() -> None:
    """The largest uniform, 1 - 2^-24, gives Gumbel noise 16.636: a token 19.2 nats below the mode still
    wins when the mode's noise is below -2.56, and the native draw must not skip it as hopeless."""
    from rast_kernels.rng import row_key, token_gumbel, token_uniform

    far, mode = 32176, 575317  # for seed 17: the top uniform, and noise -2.617
    key = row_key(torch.tensor([17]), torch.tensor([0]))
    assert token_uniform(key, mode + 1)[0, far] == 1 - 2**-24 and token_gumbel(key, mode + 1)[0, mode] < -2.6
    logits = torch.full((1, mode + 1), float("-inf"))
    logits[0, mode], logits[0, far] = 0.0, -19.2
    assert rk.rast_sample(logits, seed=17, backend="torch").item() == far
    assert rk.rast_sample(logits, seed=17, backend="native").item() == far


def test_batch_invariance_and_thread_count() -> None:
    gen = torch.Generator().manual_seed(11)
    logits, deltas, kw = _case(gen, 9, 700, 2, torch.bfloat16)
    seed, offset = torch.arange(9) * 7, torch.arange(9) + 100
    full = rk.rast_sample(logits, deltas, seed=seed, offset=offset, backend="native", **kw)
    full_p = rk.rast_probs(logits, deltas, backend="native", **kw)
    perm = torch.randperm(9, generator=gen)
    pick = {k: (v[perm] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    permuted = rk.rast_sample(logits[perm], [(a[perm], b[perm]) for a, b in deltas], seed=seed[perm],
                              offset=offset[perm], backend="native", **pick)
    assert torch.equal(permuted, full[perm])
    for r in (0, 4, 8):
        one = {k: (v[r:r + 1] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        sub = [(a[r:r + 1], b[r:r + 1]) for a, b in deltas]
        assert rk.rast_sample(logits[r:r + 1], sub, seed=seed[r:r + 1], offset=offset[r:r + 1],
                              backend="native", **one).item() == full[r].item()
        assert torch.equal(rk.rast_probs(logits[r:r + 1], sub, backend="native", **one)[0], full_p[r])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(rk.rast_sample(logits, deltas, seed=seed, offset=offset, backend="native", **kw), full)
    finally:
        torch.set_num_threads(threads)


def test_greedy_ties_take_lowest_index() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [float("nan"), 2.0, 2.0, float("inf")], [5.0, 5.0, 5.0, 5.0]])
    ids = rk.rast_sample(logits, temperature=0.0, seed=123, backend="native")
    assert ids.tolist() == [1, 1, 0]
    probs = rk.rast_probs(logits, temperature=0.0, backend="native")
    assert torch.equal(probs, torch.nn.functional.one_hot(ids, 4).float())


def test_non_finite_tokens_and_rows() -> None:
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([
        [1.0, nan, 2.0, inf, 0.5, -inf],  # NaN and +-inf tokens are excluded
        [-inf] * 6,                        # nothing admissible
        [nan] * 6,
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],    # excluded through the delta only
    ])
    rl = torch.zeros(4, 6)
    rl[3, 5] = inf
    rl[3, 4] = nan
    base = torch.zeros(4, 6)
    for kw in (dict(), dict(top_p=0.5), dict(top_k=2, min_p=0.1)):
        got, want = _both_probs(logits, [(rl, base)], **kw)
        _assert_same_distribution(got, want)
        assert got[0, [1, 3, 5]].eq(0).all() and got[3, 4:].eq(0).all()
        assert got[1:3].eq(0).all()
        for seed in range(20):
            ids = rk.rast_sample(logits, [(rl, base)], seed=seed, backend="native", **kw)
            assert ids[1].item() == -1 and ids[2].item() == -1
            assert ids[0].item() in (0, 2, 4) and 0 <= ids[3].item() <= 3


@pytest.mark.parametrize("temperature", [1e-30, 1e-6])
def test_tiny_temperature_returns_the_mode(temperature: float) -> None:
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(5, 300, generator=gen) * 1e3
    mode = logits.argmax(dim=1)
    ids = rk.rast_sample(logits, temperature=temperature, seed=torch.arange(5), backend="native")
    assert torch.equal(ids, mode)
    got, want = _both_probs(logits, (), temperature=temperature)
    _assert_same_distribution(got, want)


def test_ids_stay_in_range_under_random_params() -> None:
    rng = np.random.default_rng(17)
    for trial in range(30):
        v0 = int(rng.integers(1, 400))
        gen = torch.Generator().manual_seed(trial)
        logits, deltas, kw = _case(gen, 5, v0, int(rng.integers(0, 3)), DTYPES[trial % 3], levels=trial % 3)
        mask = torch.rand(logits.shape, generator=gen) < 0.2
        logits = logits.masked_fill(mask, float(rng.choice([np.nan, np.inf, -np.inf])))
        ids = rk.rast_sample(logits, deltas, seed=trial, backend="native", **kw)
        vocab = min([v0] + [t.shape[1] for pair in deltas for t in pair])
        assert bool(((ids >= -1) & (ids < vocab)).all())
        assert torch.equal(ids, rk.rast_sample(logits, deltas, seed=trial, backend="torch", **kw))
