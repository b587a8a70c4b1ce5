"""bench/host_path.py end to end on the CPU: per-step host work split into its parts, for each batch."""
from __future__ import annotations

from pathlib import Path

from bench_runs import run_bench


def test_quick_run_splits_each_step(tmp_path: Path) -> None:
    result, _, _ = run_bench("host_path.py", tmp_path, "--quick", pattern="host-path-*.json")
    assert result["decode_stubbed"] and result["commit"] and result["device"]
    rows = result["rows"]
    assert [(r["async_scheduling"], r["output_kind"], r["batch"], r["requests"]) for r in rows] == [
        (ahead, kind, b, b) for ahead, kind in ((False, "cumulative"), (True, "cumulative"), (True, "delta"),
                                                (True, "final_only")) for b in (1, 4)] + [
        (False, "final_only", 2, 8), (True, "final_only", 2, 8)]  # eight requests through two slots
    queued = rows[-2:]
    rows = rows[:-2]
    # neither the queue nor the admissions stop steps ahead: the host waits with nothing queued only
    # after the last step (the lengths differ, so the two slots never free at the same step)
    assert queued[0]["idle_steps"] == queued[0]["steps"] and queued[1]["idle_steps"] == 1
    for r in rows:
        assert r["steps"] == 10  # max_tokens = steps + 3, three steps before timing (one is the prefill)
        assert min(r["commit_us"], r["outputs_us"]) > 0
        parts = r["launch_ahead_us"] + r["commit_us"] + r["launch_us"] + r["outputs_us"]
        assert abs(r["host_us"] - parts) < 1e-6
        if r["async_scheduling"]:  # every step but the last launched its successor ahead
            assert r["launch_ahead_us"] > 0 and r["idle_steps"] == 1
        else:
            assert r["launch_ahead_us"] == 0 and r["idle_steps"] == r["steps"]
            assert abs(r["critical_us"] - r["commit_us"] - r["launch_us"]) < 1e-6
