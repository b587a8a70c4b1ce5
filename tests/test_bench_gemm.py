"""bench/gemm.py end to end on the CPU (tiny shapes): one row per projection and token count, each with
its weight-bytes floor; and the projections of a real config, merged as the engine merges them."""
from __future__ import annotations

import json
from pathlib import Path

from bench_runs import load_bench, run_bench


def test_quick_run_writes_a_row_per_projection(tmp_path: Path) -> None:
    result, _, out = run_bench("gemm.py", tmp_path, "--quick", pattern="gemm-*.json")
    rows = result["rows"]
    assert [(r["proj"], r["tokens"]) for r in rows] == [(p, t) for p in ("qkv", "o", "gate_up", "down", "lm_head")
                                                        for t in (1, 4)]
    qkv = rows[0]
    assert (qkv["n_in"], qkv["n_out"]) == (64, 128)  # 4 q heads and 2 + 2 kv heads of 16
    assert all(r["us"] > 0 and r["floor_us"] > 0 for r in rows)
    assert "CPU smoke run" in out


def test_projections_of_qwen_7b() -> None:
    gemm = load_bench("gemm.py")
    cfg = json.loads((Path(gemm.__file__).parent / "configs" / "qwen2.5-7b.json").read_text())
    assert gemm.projections(cfg) == {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888),
                                     "down": (18944, 3584), "lm_head": (3584, 152064)}
