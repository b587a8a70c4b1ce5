"""Hypothesis fuzzing of rast_sample / rast_probs: whatever the inputs (NaN, +-inf, huge values, odd
widths, any parameters), an id outside [-1, V) never comes back, -1 comes back exactly for rows
without a finite token, the drawn id has positive probability and rows of rast_probs sum to 1 or 0."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rast_kernels as rk

BACKENDS = [b for b in ("torch", "triton", "native") if b in rk.available_backends()]
# The Triton interpreter costs ~0.05 s per row and kernel: fewer examples there.
EXAMPLES = {"torch": 60, "native": 60, "triton": 25 if not torch.cuda.is_available() else 60}
ENTRY = st.one_of(st.floats(-30, 30, width=32), st.sampled_from([math.nan, math.inf, -math.inf, 3e38, -3e38]))


@st.composite
def cases(draw: st.DrawFn) -> dict:
    b = draw(st.integers(1, 3))
    widths = [draw(st.integers(1, 40))]
    pairs = draw(st.integers(0, 2))
    widths += [widths[0] + draw(st.integers(-3, 3)) for _ in range(pairs)]
    widths = [max(1, w) for w in widths]
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))

    def tensor(w: int) -> torch.Tensor:
        vals = draw(st.lists(ENTRY, min_size=b * w, max_size=b * w))
        return torch.tensor(vals, dtype=torch.float32).reshape(b, w).to(dtype)

    def rows(strategy: st.SearchStrategy) -> list:
        return draw(st.lists(strategy, min_size=b, max_size=b))

    return dict(
        logits=tensor(widths[0]),
        deltas=[(tensor(w), tensor(w)) for w in widths[1:]],
        weights=torch.tensor(rows(st.lists(st.floats(-2, 2), min_size=pairs, max_size=pairs))).reshape(b, pairs),
        temperature=torch.tensor(rows(st.sampled_from([0.0, 1e-30, 1e-3, 0.7, 1.0, 5.0]))),
        top_k=torch.tensor(rows(st.integers(-1, 45)), dtype=torch.int32),
        top_p=torch.tensor(rows(st.sampled_from([1e-30, 0.1, 0.5, 0.95, 1.0]))),
        min_p=torch.tensor(rows(st.sampled_from([0.0, 0.05, 0.5, 1.0]))),
        seed=torch.tensor(rows(st.integers(-2**63, 2**63 - 1)), dtype=torch.int64),
        vocab_size=draw(st.one_of(st.none(), st.integers(1, 50))),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_stay_in_range(backend: str) -> None:
    @settings(max_examples=EXAMPLES[backend], deadline=None, suppress_health_check=list(HealthCheck))
    @given(cases())
    def check(case: dict) -> None:
        seed = case.pop("seed")
        probs = rk.rast_probs(backend=backend, **case)
        ids = rk.rast_sample(backend=backend, seed=seed, offset=seed // 3, **case)
        v = probs.shape[1]
        assert ids.dtype == torch.int64 and bool(((ids >= -1) & (ids < v)).all()), ids
        sums = probs.double().sum(dim=1)
        assert bool(((sums - 1).abs() < 1e-4).logical_or(sums == 0).all()), sums
        assert bool(((ids == -1) == (sums == 0)).all()), (ids, sums)
        drawn = ids >= 0
        assert bool((probs[drawn].gather(1, ids[drawn][:, None]) > 0).all()), (ids, probs)

    check()
