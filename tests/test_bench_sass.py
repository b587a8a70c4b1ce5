"""bench/sass_loops.py: _select, _stats and _finish compiled for sm_90 under an H100's launch plans, with their
loops listed. _select's fast-path bisections must not spill: a spilled register tile turns every round's
elementwise work into local-memory traffic (a 4-ary variant with a [4096, 16] one-hot tile spilled 480
bytes). The fallback's histogram passes keep per-lane partials, so their inner loops hold no barrier (at
8759dcb each held 18 or 24, and the descent cost 3.8 ms a step on an H100)."""
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
        assert sum(loop["barriers"] == 0 for loop in loops[2:]) == 2  # the top-k and top-p histogram passes
    assert "instructions" in out


def test_stats_compiles_for_each_batch_plan(tmp_path: Path) -> None:
    """_stats' loop over a chunk's blocks keeps lane-local lists and sums: no block-wide wait, shuffle or
    spill traffic per block (at e9d0a9f, before them, it held 33-52 barriers and 1299-1638 instructions
    per block at 4 warps). At 8 warps sample() caps it at 128 registers, two programs per SM, and it
    spills nothing (Triton 3.9 and 3.6 alike; uncapped, 133)."""
    result, _, _ = run_bench("sass_loops.py", tmp_path, "--kernel", "stats", pattern="sass-stats-*.json")
    assert result["kernel"] == "_stats"
    assert [(p["batch"], p["splits"], p["cap"], p["num_warps"]) for p in result["plans"]] == \
        [(1, 149, 16, 8), (32, 17, 128, 8), (256, 7, 512, 8)]
    for plan in result["plans"]:
        assert plan["registers"] <= 128 and plan["spill_stack_bytes"] == 0, plan
        blocks = plan["loops"][0]
        assert blocks["barriers"] == blocks["shuffles"] == blocks["local_memory"] == 0, plan["loops"]


def test_finish_proof_pass_holds_no_barrier(tmp_path: Path) -> None:
    """_finish's first loop is the one read that proves a flat top-p row's draw: lane-local partials,
    so no block-wide wait and no spill traffic per block of tokens. (Compiled for aligned rows, as the
    launcher does, it takes 156-158 registers and spills nothing; without that promise, 128 and 40 bytes
    of scalars outside the loops.)"""
    result, _, _ = run_bench("sass_loops.py", tmp_path, "--kernel", "finish", pattern="sass-finish-*.json")
    assert result["kernel"] == "_finish" and [p["batch"] for p in result["plans"]] == [1, 32]
    for plan in result["plans"]:
        assert plan["spill_stack_bytes"] <= 64 and plan["num_warps"] == 8, plan
        assert plan["loops"][0]["barriers"] == 0 and plan["loops"][0]["local_memory"] == 0, plan["loops"]


def test_skinny_linear_streams_its_weights_without_a_barrier(tmp_path: Path) -> None:
    """rast_kernels.skinny_linear under an H100's plans at Qwen2.5-7B's projections: one loop over K, with no
    block-wide wait, shuffle or spill traffic in it, and no spill at 1 or 4 rows."""
    result, _, _ = run_bench("sass_loops.py", tmp_path, "--kernel", "skinny", pattern="sass-skinny-*.json")
    assert result["kernel"] == "_skinny"
    assert [(p["proj"], p["rows"]) for p in result["plans"]] == \
        [(proj, rows) for proj in ("qkv", "o", "gate_up", "down", "lm_head") for rows in (1, 4)]
    for plan in result["plans"]:
        assert plan["spill_stack_bytes"] == 0 and plan["registers"] <= 255, plan
        (loop,) = plan["loops"]
        assert loop["barriers"] == loop["shuffles"] == loop["local_memory"] == 0, plan
