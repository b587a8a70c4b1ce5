"""bench/host_path.py end to end on the CPU: per-step host work split into its parts, for each batch."""
from __future__ import annotations

from pathlib import Path

from bench_runs import run_bench


def test_quick_run_splits_each_step(tmp_path: Path) -> None:
    result, _, _ = run_bench("host_path.py", tmp_path, "--quick", pattern="host-path-*.json")
    assert result["decode_stubbed"] and result["commit"] and result["device"]
    assert [r["batch"] for r in result["rows"]] == [1, 4]
    for r in result["rows"]:
        assert r["steps"] == 10  # max_tokens = steps + 3, three steps before timing (one is the prefill)
        assert min(r["commit_us"], r["launch_us"], r["outputs_us"]) > 0
        assert r["critical_us"] == r["commit_us"] + r["launch_us"]
