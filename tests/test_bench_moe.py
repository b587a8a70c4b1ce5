"""bench/moe.py end to end on the CPU (tiny shapes, the Triton kernels interpreted): a row per impl and
token count, each with the floor of the experts its routing names."""
from __future__ import annotations

from pathlib import Path

import pytest
from bench_runs import run_bench


def test_quick_run_writes_a_row_per_impl_and_token_count(tmp_path: Path) -> None:
    result, _, out = run_bench("moe.py", tmp_path, "--quick", pattern="moe-*.json", env={"TRITON_INTERPRET": "1"})
    rows = result["rows"]
    assert [(r["impl"], r["tokens"]) for r in rows] == [(i, t) for t in (1, 4)
                                                        for i in ("torch-routed", "torch-all", "fused", "fused-fp8")]
    assert result["experts"] == 8 and result["experts_per_token"] == 2
    one = [r for r in rows if r["tokens"] == 1]
    assert all(r["experts_read"] == 2 for r in one)  # one token reads its k experts
    # the floor is the routed experts' bytes (3 * 64 * 32 float32 weights each; in FP8 a byte each and a
    # float32 scale per output channel) over the copy bandwidth
    per_expert = {"fp": 3 * 64 * 32 * 4, "fp8": 3 * 64 * 32 + 4 * (2 * 32 + 64)}
    for r in rows:
        assert 2 <= r["experts_read"] <= 8 and r["us"] > 0
        expert_bytes = per_expert["fp8" if r["impl"] == "fused-fp8" else "fp"]
        want = r["experts_read"] * expert_bytes / (result["copy_gbs"] * 1e9) * 1e6
        assert r["floor_us"] == pytest.approx(want, rel=0.05, abs=0.01)
    assert "CPU smoke run" in out
