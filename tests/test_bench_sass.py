"""bench/sass_loops.py: _select compiled for sm_90 under an H100's launch plans, with its loops listed.
Its fast-path bisections must not spill: a spilled register tile turns every round's elementwise work
into local-memory traffic (a 4-ary variant with a [4096, 16] one-hot tile spilled 480 bytes)."""
from __future__ import annotations

from pathlib import Path

from bench_runs import run_bench


def test_select_compiles_without_spills_and_lists_its_loops(tmp_path: Path) -> None:
    result, _, out = run_bench("sass_loops.py", tmp_path, pattern="sass-select-*.json")
    assert result["kernel"] == "_select" and result["target"] == "sm_90" and result["commit"]
    assert [p["batch"] for p in result["plans"]] == [1, 32]
    for plan in result["plans"]:
        assert plan["spill_stack_bytes"] == 0, plan
        assert 0 < plan["registers"] <= 255
        loops = plan["loops"]
        # the top-k and top-p bisections come first, then the fallback's descent passes
        assert len(loops) >= 4 and all(0 < loop["instructions"] < plan["instructions"] for loop in loops)
        assert all(loop["barriers"] >= 1 for loop in loops[:2])  # each round ends in a block-wide reduction
    assert "instructions" in out
