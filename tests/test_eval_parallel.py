"""`rast eval --data-parallel-size N` (engine/evaluation/parallel.py): worker processes share the problems.

Oracle: the single-engine run. Every sample's seed depends only on (seed, problem id, index), so two
workers on the CPU must save exactly the samples one engine saves, in whatever order they finish."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rast_engine.errors import RastError
from rast_engine.evaluation import runner
from rast_engine.evaluation.parallel import worker_devices

PROBLEMS = ["what is 3 + 5?", "the cat sat on the mat. what is 2 * 4?", "add 12 and 9.", "hello world! this",
            "what is the answer?"]


def _config(triple: tuple, data: Path, out: Path, **kw: object) -> runner.EvalConfig:
    large, rl, base = map(str, triple)
    return runner.EvalConfig(model=large, small_rl=rl, small_base=base, lam=0.5, data=str(data), out=str(out),
                             template="b", n=3, temperature=1.0, top_p=0.9, max_tokens=6, device="cpu",
                             dtype="float32", seed=5, max_inflight=2, plots=False, **kw)


def _saved(out: Path) -> dict[tuple[str, int], str]:
    recs = [json.loads(x) for x in (out / runner.SAMPLES_FILE).read_text().splitlines() if x.strip()]
    got = {(r["id"], r["index"]): r["text"] for r in recs}
    assert len(got) == len(recs)  # no sample saved twice
    return got


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "problem": p, "answer": "8"}) + "\n"
                            for i, p in enumerate(PROBLEMS)))
    return path


def test_two_workers_save_the_samples_one_engine_saves(qwen2_triple: tuple, data: Path, tmp_path: Path) -> None:
    one = runner.run_eval(_config(qwen2_triple, data, tmp_path / "one"))
    two = runner.run_eval(_config(qwen2_triple, data, tmp_path / "two", data_parallel_size=2))
    want = _saved(tmp_path / "one")
    assert len(want) == len(PROBLEMS) * 3 and _saved(tmp_path / "two") == want
    assert {k: v for k, v in two.items() if k != "settings"} == {k: v for k, v in one.items() if k != "settings"}


def test_a_failing_worker_stops_the_run_with_its_error(data: Path, tmp_path: Path) -> None:
    cfg = _config(("/no/such/model", "/no/rl", "/no/base"), data, tmp_path / "run", data_parallel_size=2)
    with pytest.raises(RastError, match=r"worker \d \(cpu\) failed(.|\n)*/no/such/model"):
        runner.run_eval(cfg)


def test_workers_take_one_gpu_each_or_share_the_cpu() -> None:
    assert worker_devices("cpu", 3) == ["cpu"] * 3
    with pytest.raises(RastError, match="cuda:r"):
        worker_devices("cuda:1", 2)
    with pytest.raises(RastError, match="data-parallel-size"):
        runner.EvalConfig(model="m", data="d", out="o", data_parallel_size=0)
