"""bench/speculative.py end to end on the CPU: the toy triple's trained pair drafts tokens the large model
accepts, and the rows carry what the docstring promises."""
from __future__ import annotations

from pathlib import Path

from bench_runs import run_bench


def test_quick_run_accepts_drafts_on_the_toy_triple(tmp_path: Path) -> None:
    result, _, out = run_bench("speculative.py", tmp_path, "--quick", pattern="speculative-*.json")
    rows = result["rows"]
    assert result["triple"] == "engine/assets/toy" and "speculative RAST, toy triple" in out
    assert [(r["batch"], r["gamma"], r["method"], r["requests"]) for r in rows] == [(1, 0, None, 4), (1, 2, "coupled", 4)]
    plain, spec = rows
    assert plain["acceptance"] is None and plain["speedup"] == 1
    assert 0 < spec["acceptance"] <= 1  # trained weights: drafts are accepted (random ones: almost never)
    assert spec["tokens"] == plain["tokens"]  # coupled: the plain sampler's tokens, so as many of them
    for r in rows:
        assert r["tokens"] > 0 and r["tokens_per_s"] == r["tokens"] / r["seconds"]
    assert spec["speedup"] == spec["tokens_per_s"] / plain["tokens_per_s"]
