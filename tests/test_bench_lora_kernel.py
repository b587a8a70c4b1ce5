"""bench/lora_kernel.py end to end (interpreted on the CPU), and its byte counts against the tensors each
implementation reads and writes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench_runs import load_bench, run_bench


def test_quick_run_writes_every_configuration(tmp_path: Path) -> None:
    result, _, _ = run_bench("lora_kernel.py", tmp_path, "--quick", pattern="lora-kernel-*.json",
                             env={"TRITON_INTERPRET": "1"})
    assert result["commit"] and result["device"] and result["copy_gbs"] > 0
    rows = result["rows"]
    assert {(r["slots"], r["tokens"], r["impl"]) for r in rows} == {
        (n, t, impl) for n in (1, 2) for t in (1, 5) for impl in ("gathered", "masked")}
    for r in rows:
        assert r["us"] > 0 and r["gbs"] == pytest.approx(r["bytes"] / r["us"] / 1e3)


@pytest.mark.parametrize("tokens, slots", [(1, 4), (6, 4), (3, 1)])
def test_bytes_are_the_slots_read(tokens: int, slots: int) -> None:
    """gathered: min(slots, tokens) slots' A and each row's own part of B; masked: every slot's A and B."""
    bench = load_bench("lora_kernel.py")
    k, starts, n, rank = 64, [0, 40, 48], 56, 8
    t = bench.make(k, starts, n, slots, rank, tokens, torch.bfloat16, torch.device("cpu"))
    per_slot_a, used = t["a"].numel() // slots, min(slots, tokens)
    io = t["x"].numel() + 2 * tokens * n
    assert bench.bytes_moved(t, n, 2, all_slots=True) == 2 * (t["a"].numel() + t["b"].numel() + io)
    assert bench.bytes_moved(t, n, 2, all_slots=False) == 2 * (used * (per_slot_a + n * rank) + io)
    nonzero_b = int((t["b"] != 0).sum())  # the diagonal blocks: what the gathered kernel reads of every slot
    assert nonzero_b == slots * n * rank
