"""bench/throughput.py on the CPU's tiny pairing: every request is made whole, and the floor is the bytes
counted by hand from the engine's own cache layout (ModelConfig) and the weights' parameter counts."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from bench_runs import load_bench
from rast_engine.models.config import ModelConfig


def test_quick_run_counts_every_token_and_its_floor(tmp_path: Path) -> None:
    bench = load_bench("throughput.py")
    assert bench.main(["--quick", "--num-prompts", "5", "--range-ratio", "0.5", "--max-num-seqs", "2",
                       "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("throughput-*.json")
    doc = json.loads(path.read_text())
    rows = {r["mode"]: r for r in doc["rows"]}
    assert set(rows) == {"base", "rast"}
    from bench.decode_configs import TINY

    tiny = [TINY["tiny-large"], TINY["tiny-small"], TINY["tiny-small"]]
    reqs = bench.requests(5, 16, 8, 0.5, min(c["vocab_size"] for c in tiny), 0)
    for mode, row in rows.items():
        assert row["output_tokens"] == sum(g for _, g in reqs) and row["input_tokens"] == sum(len(p) for p, _ in reqs)
        assert row["steps"] >= sum(g for _, g in reqs) / 2  # two slots: the requests queue
        cfgs = tiny if mode == "rast" else tiny[:1]
        weights = sum(bench.param_counts(c)[1] * 4 for c in cfgs)  # float32 on the CPU
        kv = sum(ModelConfig.from_dict(c).kv_bytes_per_token(torch.float32) for c in cfgs)
        by_hand = row["steps"] * weights + kv * sum(len(p) + k for p, g in reqs for k in range(1, g + 1))
        assert abs(row["floor_s"] * doc["copy_bandwidth_GBps"] * 1e9 - by_hand) <= 1e-6 * by_hand


def test_zero_lengths_are_refused_not_replaced() -> None:
    import pytest

    bench = load_bench("throughput.py")
    for flag in ("--num-prompts", "--input-len", "--output-len"):
        with pytest.raises(SystemExit):
            bench.parse([flag, "0"])


def test_the_moe_pairing_runs_on_the_cpu(tmp_path) -> None:  # noqa: ANN001
    """tiny-moe (a tiny Qwen3-MoE as the large model): every request made whole, a positive floor."""
    bench = load_bench("throughput.py")
    assert bench.main(["--quick", "--pairings", "tiny-moe", "--num-prompts", "3", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("throughput-*.json")).read_text())["rows"]
    assert {(r["pairing"], r["mode"]) for r in rows} == {("tiny-moe", "base"), ("tiny-moe", "rast")}
    assert all(r["output_tokens"] > 0 and r["floor_s"] > 0 for r in rows)
