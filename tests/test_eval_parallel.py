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


def test_a_failed_run_exits_though_problems_were_left_queued(tmp_path: Path) -> None:
    """Problems no worker took (here: all of a MATH500-sized list, the workers failing at once) must not
    keep the process from exiting with the error."""
    import subprocess
    import sys

    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "problem": "x" * 300, "answer": "1"}) + "\n"
                            for i in range(500)))
    argv = ["eval", "--model", "/no/such/model", "--data", str(data), "--out", str(tmp_path / "run"), "--n", "1",
            "--device", "cpu", "--data-parallel-size", "2", "--no-plots"]
    code = f"import sys; from rast_engine.cli import main; sys.exit(main({argv!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "/no/such/model" in done.stderr


def test_a_short_list_is_shared_by_every_worker(monkeypatch: pytest.MonkeyPatch, data: Path, tmp_path: Path) -> None:
    """Each worker keeps at most its share of the problems in flight, so the first one loaded cannot take
    a short list whole (the default max_inflight is sized for one engine)."""
    from rast_engine.evaluation import parallel

    started: list[runner.EvalConfig] = []

    class Recorded:
        def __init__(self, target: object, args: tuple, daemon: bool) -> None:
            started.append(args[1])

        def start(self) -> None:
            raise RuntimeError("recorded")

        def is_alive(self) -> bool:
            return False

        def join(self) -> None:
            pass

    class Context:
        Queue = staticmethod(__import__("queue").Queue)
        Process = Recorded

    monkeypatch.setattr(parallel.mp, "get_context", lambda method: Context())
    cfg = runner.EvalConfig(model="m", data=str(data), out=str(tmp_path), device="cpu", data_parallel_size=2)
    todo = [(runner.Problem(id=f"p{i}", problem="q", answer="1"), [(0, 4)]) for i in range(5)]
    with pytest.raises(RuntimeError, match="recorded"):
        parallel.sample_in_parallel(cfg, todo, lambda records: None)
    assert cfg.max_inflight == 16 and started[0].max_inflight == 3  # 5 problems, 2 workers
