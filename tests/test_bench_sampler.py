"""bench/sampler.py: its CPU quick run end to end, and its verdicts on issue 2's targets against the
arithmetic of the rows they judge."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench_runs import load_bench, run_bench

sampler = load_bench("sampler.py")


def _row(impl: str, batch: int, us: float, floor: float = 78.0, vocab: int = 152064) -> dict:
    return dict(impl=impl, batch=batch, vocab=vocab, pairs=1, top_k=0, min_p=0.0, us_median=us, floor_us=floor)


def test_targets_judge_the_named_shapes_only() -> None:
    rows = [_row("fused-graph", 256, 150.0), _row("unfused", 256, 1600.0), _row("fused-graph", 1, 19.0),
            _row("fused-graph", 32, 25.0), _row("fused", 256, 170.0),
            _row("fused-graph", 8, 5.0, vocab=32000)]  # another vocab: not a target shape
    got = {t["target"]: t for t in sampler.targets(rows)}
    assert set(got) == {"fused-graph B=256 time / floor", "fused-graph B=256 speedup vs unfused",
                        "fused-graph B=1 us", "fused-graph B=32 us", "fused B=256 time / floor",
                        "fused B=256 speedup vs unfused"}
    assert got["fused-graph B=256 time / floor"]["value"] == pytest.approx(150 / 78)
    assert got["fused-graph B=256 time / floor"]["met"]
    assert got["fused B=256 time / floor"]["value"] == pytest.approx(170 / 78) and not got["fused B=256 time / floor"]["met"]
    assert got["fused-graph B=256 speedup vs unfused"]["value"] == pytest.approx(1600 / 150)
    assert got["fused-graph B=256 speedup vs unfused"]["met"] and not got["fused B=256 speedup vs unfused"]["met"]
    assert got["fused-graph B=1 us"]["met"] and not got["fused-graph B=32 us"]["met"]


def test_quick_run_writes_rows_and_no_targets(tmp_path: Path) -> None:
    result, path, stdout = run_bench("sampler.py", tmp_path, "--quick", "--cpu", pattern="sampler-*.json")
    assert result["rows"] and all(r["us_median"] > 0 and r["floor_us"] > 0 for r in result["rows"])
    assert result["targets"] == []  # --quick has no V=152064 shape
    native = [r for r in result["rows"] if r["impl"] == "native"]
    assert all(r["kernels_us"] and all(us > 0 for us in r["kernels_us"].values()) for r in native)
    assert result["device"] in stdout


def test_a_quick_cpu_run_writes_no_result_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --quick smoke run on the CPU keeps no file in bench/results (it would take the name of a real CPU
    result at the commit, docs/benchmarks.md); --out, a full run or a GPU does."""
    from bench import common

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    sampler.main(["--quick", "--cpu", "--impl", "torch"])
    assert not (tmp_path / "results").exists()
    cpu, cuda = common.torch.device("cpu"), common.torch.device("cuda")
    assert common.keeps_results(tmp_path, cpu, True) and common.keeps_results(None, cuda, True)
    assert common.keeps_results(None, cpu, False) and not common.keeps_results(None, cpu, True)
