"""SamplingParams' own checks (every bad field is a RastError naming it) and the per-sample seeds."""
from __future__ import annotations

import pytest

from rast_engine import SamplingParams
from rast_engine.errors import RastError
from rast_engine.sampling_params import sample_seed


@pytest.mark.parametrize("kwargs, field", [
    (dict(n=0), "n"), (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"), (dict(min_p=2.0), "min_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-3]), "stop_token_ids"),
    (dict(seed=1.5), "seed"), (dict(lam=float("nan")), "lam"), (dict(logprobs=-1), "logprobs"),
    (dict(ignore_eos="yes"), "ignore_eos"), (dict(lam=[]), "lam"), (dict(lam=[0.5, float("inf")]), "lam"),
    (dict(lam=["0.5"]), "lam"), (dict(lam=[True]), "lam"), (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    (dict(truncate_prompt_tokens=2.0), "truncate_prompt_tokens"),
])
def test_sampling_params_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(RastError, match=field) as info:
        SamplingParams(**kwargs)
    assert info.value.param == field  # the server's 400 names it


def test_sample_seeds_are_distinct_and_stable() -> None:
    seeds = [sample_seed(42, i) for i in range(64)]
    assert len(set(seeds)) == 64 and seeds == [sample_seed(42, i) for i in range(64)]
    assert sample_seed(43, 0) != seeds[0] and all(-(2**63) <= s < 2**63 for s in seeds)
