"""bench/gemm.py end to end on the CPU (tiny shapes): one row per projection and token count, each with
its weight-bytes floor; and the projections of a real config, merged as the engine merges them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_runs import load_bench, run_bench


def test_quick_run_writes_a_row_per_projection(tmp_path: Path) -> None:
    result, _, out = run_bench("gemm.py", tmp_path, "--quick", pattern="gemm-*.json")
    rows = result["rows"]
    # each projection in the model's dtype, in FP8 but lm_head (quantization="fp8" keeps it), and by the
    # skinny kernel (interpreted: conftest runs the tests, and so the bench, with TRITON_INTERPRET=1)
    want = [(p, i, t) for p in ("qkv", "o", "gate_up", "down", "lm_head")
            for i in (("fp32", "fp8", "skinny") if p != "lm_head" else ("fp32", "skinny")) for t in (1, 4)]
    assert [(r["proj"], r["impl"], r["tokens"]) for r in rows] == want
    qkv = rows[0]
    assert (qkv["n_in"], qkv["n_out"]) == (64, 128)  # 4 q heads and 2 + 2 kv heads of 16
    assert all(r["us"] > 0 and r["floor_us"] > 0 for r in rows)
    fp8 = next(r for r in rows if r["impl"] == "fp8")  # a byte a weight and a float32 scale a channel
    assert fp8["floor_us"] == pytest.approx((64 * 128 + 4 * 128) / (64 * 128 * 4) * qkv["floor_us"], rel=0.02)
    assert "CPU smoke run" in out


def test_projections_of_qwen_7b() -> None:
    gemm = load_bench("gemm.py")
    cfg = json.loads((Path(gemm.__file__).parent / "configs" / "qwen2.5-7b.json").read_text())
    assert gemm.projections(cfg) == {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888),
                                     "down": (18944, 3584), "lm_head": (3584, 152064)}
