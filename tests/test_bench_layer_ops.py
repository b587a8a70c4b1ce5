"""bench/layer_ops.py end to end (interpreted on the CPU), and its byte counts against the tensors the
ops actually read and write."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench_runs import load_bench, run_bench


def test_quick_run_writes_every_op_and_impl(tmp_path: Path) -> None:
    result, _, _ = run_bench("layer_ops.py", tmp_path, "--quick", pattern="layer-ops-*.json",
                             env={"TRITON_INTERPRET": "1"})
    assert result["commit"] and result["device"] and result["copy_gbs"] > 0
    rows = result["rows"]
    assert {(r["model"], r["op"], r["impl"], r["tokens"]) for r in rows} == {
        (m, op, impl, t) for m in ("tiny", "tiny-qk-norm")
        for op in ("add_rms_norm", "rotary", "rotary_store", "silu_and_mul", "layer") for impl in ("fused", "torch")
        for t in (1, 5)}
    for r in rows:
        assert r["us"] > 0 and r["floor_us"] == pytest.approx(r["bytes"] / (result["copy_gbs"] * 1e3))


@pytest.mark.parametrize("tokens,qk_norm", [(1, False), (7, False), (7, True)])
def test_bytes_are_the_tensors_read_and_written(tokens: int, qk_norm: bool) -> None:
    bench = load_bench("layer_ops.py")
    shape = (64, 4, 2, 16, 96, qk_norm)
    t = bench.make_inputs(tokens, shape, torch.bfloat16, torch.device("cpu"))
    nbytes = lambda *xs: sum(x.numel() * x.element_size() for x in xs)  # noqa: E731
    norm = nbytes(t["x"], t["residual"], t["weight"]) + 2 * nbytes(t["x"])
    rotary = 2 * nbytes(t["q"], t["k"]) + tokens * shape[3] * 2 + (nbytes(*t["qk_norm"][:2]) if qk_norm else 0)
    store = 3 * nbytes(t["v"]) + nbytes(t["slots"])  # read v, write k and v
    silu = nbytes(t["gate_up"]) * 3 // 2
    assert bench.bytes_moved("add_rms_norm", tokens, shape, 2) == norm
    assert bench.bytes_moved("rotary", tokens, shape, 2) == rotary
    assert bench.bytes_moved("rotary_store", tokens, shape, 2) == rotary + store
    assert bench.bytes_moved("silu_and_mul", tokens, shape, 2) == silu
    assert bench.bytes_moved("layer", tokens, shape, 2) == 2 * norm + rotary + store + silu
