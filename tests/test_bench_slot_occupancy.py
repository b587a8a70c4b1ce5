"""bench/slot_occupancy.py end to end on the CPU: requests of several samples leave no slot idle while
others wait (scheduler.py: the samples that find no slot wait at the front of the queue)."""
from __future__ import annotations

from pathlib import Path

from bench_runs import run_bench


def test_quick_run_leaves_no_slot_idle_while_samples_wait(tmp_path: Path) -> None:
    result, _, _ = run_bench("slot_occupancy.py", tmp_path, "--quick", pattern="slot-occupancy-*.json")
    rows = result["rows"]
    assert [(r["n"], r["requests"], r["slots"]) for r in rows] == [(1, 32, 8), (4, 8, 8), (8, 4, 8)]
    for r in rows:
        assert r["queued_steps"] > 0 and r["tokens"] > 0 and r["steps"] > r["queued_steps"]
        assert r["idle_slots_avg"] == 0, r
