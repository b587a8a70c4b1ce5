"""bench/logit_adjust.py end to end on the CPU, and its byte counts against the tensors the dense pass
reads and writes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench_runs import load_bench, run_bench


def test_quick_run_writes_every_kind(tmp_path: Path) -> None:
    result, _, out = run_bench("logit_adjust.py", tmp_path, "--quick", pattern="logit-adjust-*.json")
    assert result["commit"] and result["device"] and result["copy_gbs"] > 0
    rows = result["rows"]
    assert {(r["kind"], r["rows"]) for r in rows} == {(k, n) for k in ("bias", "penalties", "both") for n in (1, 4)}
    for r in rows:
        assert r["us"] > 0 and r["host_us"] > 0
        assert r["floor_us"] == pytest.approx(r["bytes"] / (result["copy_gbs"] * 1e3))
    assert "floor_us" in out


@pytest.mark.parametrize("kind", ["bias", "penalties", "both"])
def test_bytes_are_the_dense_pass(kind: str) -> None:
    bench = load_bench("logit_adjust.py")
    rows, vocab = 3, 50
    logits = 3 * rows * vocab * torch.finfo(torch.bfloat16).bits // 8
    counts = rows * vocab * 4 if kind != "bias" else 0
    assert bench.bytes_moved(kind, rows, vocab) == logits + counts + rows * vocab * 4
    draws = bench.make_draws(kind, rows, vocab, 20, 10, torch.device("cpu"))
    assert all((d.adjust.seq is not None) == (kind != "bias") for d in draws)
    assert all(bool(d.adjust.banned) == (kind != "penalties") for d in draws)
