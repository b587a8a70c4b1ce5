"""`rast eval --lams` and `--lora-modules` (engine/evaluation/variants.py): several runs in one engine, each in
OUT/<variant>/. Oracle: the single run of each variant's settings, which must save exactly the same samples
(a sample's seed depends on the seed, problem and index alone) and the same run.json, so either resumes the
other."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from rast_engine.cli import main
from rast_engine.errors import RastError
from rast_engine.evaluation import runner
from test_lora import make_adapter

pytest.importorskip("peft")
PROBLEMS = ["what is 3 + 5?", "the cat sat on the mat. what is 2 * 4?", "add 12 and 9."]


@pytest.fixture(scope="module")
def setup(qwen2_triple: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple[tuple, Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("eval-variants")
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "problem": p, "answer": "8"}) + "\n"
                            for i, p in enumerate(PROBLEMS)))
    base = qwen2_triple[2]
    adapters = {"math": str(make_adapter(base, root / "math", seed=41)),
                "code": str(make_adapter(base, root / "code", seed=42, r=2, target_modules=["v_proj", "up_proj"]))}
    return tuple(map(str, qwen2_triple)), data, adapters


def _config(setup: tuple, out: Path, **kw: object) -> runner.EvalConfig:
    (large, rl, base), data, _ = setup
    pair = {} if "lora_modules" in kw else dict(small_rl=rl)
    return runner.EvalConfig(**{**dict(model=large, small_base=base, lam=0.5, data=str(data), out=str(out),
                                       template="b", n=3, temperature=1.0, top_p=0.9, max_tokens=6, device="cpu",
                                       dtype="float32", seed=5, max_inflight=2, plots=False), **pair, **kw})


def _saved(out: Path) -> dict[tuple[str, int], str]:
    recs = [json.loads(x) for x in (out / runner.SAMPLES_FILE).read_text().splitlines() if x.strip()]
    return {(r["id"], r["index"]): r["text"] for r in recs}


def test_a_lam_sweep_saves_each_lams_single_run(setup: tuple, tmp_path: Path) -> None:
    metrics = runner.run_eval(_config(setup, tmp_path / "sweep", lams=(0.5, 1.5)))
    assert sorted(metrics) == ["lam0.5", "lam1.5"]
    for lam in (0.5, 1.5):
        single = tmp_path / f"single{lam}"
        runner.run_eval(_config(setup, single, lam=lam))
        got = tmp_path / "sweep" / f"lam{lam:g}"
        assert _saved(got) == _saved(single) and len(_saved(got)) == 3 * len(PROBLEMS)
        assert json.loads((got / runner.RUN_FILE).read_text()) == json.loads((single / runner.RUN_FILE).read_text())
        assert metrics[f"lam{lam:g}"]["avg_pass@1"] == json.loads((single / runner.METRICS_FILE).read_text())[
            "avg_pass@1"]
    assert _saved(tmp_path / "sweep" / "lam0.5") != _saved(tmp_path / "sweep" / "lam1.5")


def test_adapters_save_each_adapters_single_run_and_resume_either_way(setup: tuple, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    (large, _, base), data, adapters = setup
    out = tmp_path / "loras"
    argv = ["eval", "--model", large, "--small-base", base, "--lams", "0.5",
            "--lora-modules", *(f"{k}={v}" for k, v in adapters.items()),
            "--data", str(data), "--template", "b", "--n", "3", "--top-p", "0.9", "--max-tokens",
            "6", "--device", "cpu", "--dtype", "float32", "--seed", "5", "--max-inflight", "2", "--no-plots",
            "--out", str(out)]
    assert main(argv + ["--limit", "2"]) == 0  # two problems now, the third on the resume
    capsys.readouterr()
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(summary) == ["code-lam0.5", "math-lam0.5"]
    for name, path in adapters.items():
        single = tmp_path / name
        runner.run_eval(_config(setup, single, small_rl=path))
        assert _saved(out / f"{name}-lam0.5") == _saved(single) and len(_saved(single)) == 3 * len(PROBLEMS)
        log = io.StringIO()
        runner.run_eval(_config(setup, out / f"{name}-lam0.5", small_rl=path), log=log)  # a single run resumes it
        assert "already sampled" in log.getvalue()
    assert _saved(out / "math-lam0.5") != _saved(out / "code-lam0.5")


def test_variants_across_two_workers_save_what_one_engine_saves(setup: tuple, tmp_path: Path) -> None:
    runner.run_eval(_config(setup, tmp_path / "one", lams=(0.5, 1.0)))
    runner.run_eval(_config(setup, tmp_path / "two", lams=(0.5, 1.0), data_parallel_size=2))
    for lam in ("lam0.5", "lam1"):
        assert _saved(tmp_path / "two" / lam) == _saved(tmp_path / "one" / lam)


def test_rl_checkpoints_save_each_checkpoints_single_run(setup: tuple, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two full checkpoints of R and two λ: one engine, R's weights replaced once (after the first
    checkpoint's problems), each (checkpoint, λ) saving its single run's samples and run.json; two workers
    save the same."""
    from rast_engine import LLM
    from test_weight_updates import another_rl

    (large, rl, base), data, _ = setup
    rl2 = str(another_rl((large, rl, base), "qwen2", tmp_path))
    loads, load = [], LLM.load_weights
    monkeypatch.setattr(LLM, "load_weights", lambda self, *a, **kw: (loads.append(kw["path"]), load(self, *a, **kw))[1])
    sweep = dict(small_rl=None, rl_checkpoints=(rl, rl2), lams=(0.5, 1.5))
    metrics = runner.run_eval(_config(setup, tmp_path / "ckpts", **sweep))
    assert loads == [rl2]
    names = {f"{Path(c).name}-lam{lam:g}": (c, lam) for c in (rl, rl2) for lam in (0.5, 1.5)}
    assert sorted(metrics) == sorted(names)
    for name, (ckpt, lam) in names.items():
        single = tmp_path / name
        runner.run_eval(_config(setup, single, small_rl=ckpt, lam=lam))
        got = tmp_path / "ckpts" / name
        assert _saved(got) == _saved(single) and len(_saved(got)) == 3 * len(PROBLEMS)
        assert json.loads((got / runner.RUN_FILE).read_text()) == json.loads((single / runner.RUN_FILE).read_text())
    assert _saved(tmp_path / "ckpts" / "rl-lam0.5") != _saved(tmp_path / "ckpts" / "rl2-qwen2-lam0.5")
    runner.run_eval(_config(setup, tmp_path / "two", data_parallel_size=2, **sweep))
    for name in names:
        assert _saved(tmp_path / "two" / name) == _saved(tmp_path / "ckpts" / name)


def test_bad_variant_options_are_refused(setup: tuple, tmp_path: Path) -> None:
    (large, rl, base), data, adapters = setup
    for kw, match in ((dict(lams=(0.5, 0.5)), "distinct"), (dict(lams=()), "distinct"),
                      (dict(lams=(1e9,)), "distinct numbers"), (dict(lora_modules={}), "non-empty dict"),
                      (dict(lams=(0.0, -0.0)), "distinct"), (dict(lams=(0.1234567, 0.1234568)), "share run folders"),
                      (dict(lora_modules=adapters, small_rl=rl), "no --small-rl"),
                      (dict(lora_modules={"../up": adapters["math"]}), "cannot name a run folder"),
                      (dict(rl_checkpoints=(rl, base)), "neither --small-rl"),
                      (dict(small_rl=None, rl_checkpoints=(rl, rl)), "distinct names"),
                      (dict(small_rl=None, rl_checkpoints=()), "distinct names"),
                      (dict(lora_modules=adapters, rl_checkpoints=(rl,)), "neither --small-rl")):
        with pytest.raises(RastError, match=match):
            _config(setup, tmp_path / "x", **kw)
    with pytest.raises(RastError, match="give --small-rl and --small-base"):
        runner.EvalConfig(model=large, data=str(data), out=str(tmp_path / "y"), lams=(0.5, 1.0))


def test_the_summary_names_each_run_whatever_its_name(setup: tuple, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """An adapter named like a metrics key ("dataset") is still one run of the summary."""
    (large, _, base), data, adapters = setup
    assert main(["eval", "--model", large, "--small-base", base, "--lora-modules", f"dataset={adapters['math']}",
                 "--data", str(data), "--template", "b", "--n", "1", "--limit", "1", "--max-tokens", "3",
                 "--device", "cpu", "--dtype", "float32", "--no-plots", "--out", str(tmp_path / "run")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary) == ["dataset"] and summary["dataset"]["num_problems"] == 1
