"""bench/weight_sync.py end to end on the CPU (tiny shapes): every operation it times, with its bytes and a
floor below its time."""
from __future__ import annotations

from pathlib import Path

from bench_runs import run_bench


def test_quick_run_times_every_operation_against_its_floor(tmp_path: Path) -> None:
    result, _, out = run_bench("weight_sync.py", tmp_path, "--quick", pattern="weight-sync-*.json")
    assert result["commit"] and result["device"] and result["copy_bytes_per_s"] > 0
    rows = {r["op"]: r for r in result["rows"]}
    assert set(rows) == {"load_device", "sleep", "wake_weights", "wake_kv_cache"}  # pinned copies: CUDA only
    assert rows["sleep"]["bytes"] == rows["wake_weights"]["bytes"] > rows["load_device"]["bytes"] > 0
    for r in rows.values():
        assert 0 < r["floor_ms"] and r["ms"] > 0 and r["floor_frac"] == r["floor_ms"] / r["ms"]
    assert "weight sync and sleep" in out
