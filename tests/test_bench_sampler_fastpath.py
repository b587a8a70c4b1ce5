"""bench/sampler_fastpath.py end to end (interpreted on the CPU): LM-like rows under an H100's launch
plan, where B = 1 spreads each row over many small chunks of few candidates, take the fast path. (When
a chunk kept the first tokens it met, every such row fell back.)"""
from __future__ import annotations

from pathlib import Path

from bench_runs import run_bench


def test_quick_run_writes_fast_fractions(tmp_path: Path) -> None:
    result, _, _ = run_bench("sampler_fastpath.py", tmp_path, "--quick", pattern="sampler-fastpath-*.json",
                             env={"TRITON_INTERPRET": "1"})
    assert result["emulated"] and result["sms"] == 132 and result["commit"]
    rows = result["rows"]
    assert {(r["plan_batch"], r["top_k"]) for r in rows} == {(1, 0), (1, 50), (32, 0), (32, 50)}
    one = [r for r in rows if r["plan_batch"] == 1]
    assert all(r["splits"] == 8 and r["chunk"] == 1024 for r in one)  # 8192 tokens in 1024-token chunks
    assert all(r["fast_fraction"] == 1.0 for r in rows), rows
    # top_p 0.95 on peaked rows: a draw settles each fast row within PROOF_TRIES tries; only top-k rows
    # (with top-p) may need their top-k search first
    assert all(r["proven_fraction"] == 1.0 and 1 <= r["mean_tries"] <= r["max_tries"] <= 8 for r in rows), rows
    assert all(r["k_searched_fraction"] == 0.0 for r in rows if r["top_k"] == 0), rows
