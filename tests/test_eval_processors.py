"""`rast eval --logits-processors` (EvalConfig.logits_processors): processors by qualified name, loaded in the
process that samples, recorded as a sample setting.

Oracle: a processor returning the large model's own logits (RastParts.large) must save, greedily, the
samples of an evaluation of the large model alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rast_engine import RastParts
from rast_engine.cli import main
from rast_engine.errors import RastError
from rast_engine.evaluation import runner

PROBLEMS = ["what is 3 + 5?", "the cat sat on the mat. what is 2 * 4?"]
LARGE_ALONE = f"{__name__}.large_alone"


def large_alone(output_ids: list[int], z: torch.Tensor, *, parts: RastParts) -> torch.Tensor:
    return parts.large


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("eval-processors") / "problems.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "problem": p, "answer": "8"}) + "\n"
                            for i, p in enumerate(PROBLEMS)))
    return path


def _argv(triple: tuple, data: Path, out: Path, small: bool, *extra: str) -> list[str]:
    large, rl, base = map(str, triple)
    return ["eval", "--model", large, *(["--small-rl", rl, "--small-base", base] if small else []),
            "--data", str(data), "--template", "b", "--n", "1", "--temperature", "0", "--max-tokens", "6",
            "--device", "cpu", "--dtype", "float32", "--no-plots", "--out", str(out), *extra]


def _saved(out: Path) -> dict[tuple[str, int], str]:
    recs = [json.loads(x) for x in (out / runner.SAMPLES_FILE).read_text().splitlines() if x.strip()]
    return {(r["id"], r["index"]): r["text"] for r in recs}


def test_a_processor_returning_the_large_models_logits_is_the_large_model(qwen2_triple: tuple, data: Path,
                                                                          tmp_path: Path) -> None:
    assert main(_argv(qwen2_triple, data, tmp_path / "gated", True, "--logits-processors", LARGE_ALONE)) == 0
    assert main(_argv(qwen2_triple, data, tmp_path / "large", False)) == 0
    assert main(_argv(qwen2_triple, data, tmp_path / "rast", True)) == 0
    assert _saved(tmp_path / "gated") == _saved(tmp_path / "large") != _saved(tmp_path / "rast")
    assert json.loads((tmp_path / "gated" / runner.RUN_FILE).read_text())["logits_processors"] == [LARGE_ALONE]
    # a sample setting: the run resumes only with the same processors
    assert main(_argv(qwen2_triple, data, tmp_path / "gated", True)) == 2


@pytest.mark.parametrize("kw, says", [({"logits_processors": ("nosuch_module_xyz.fn",)}, "cannot be loaded"),
                                      ({"logits_processors": ("json",)}, "not a qualified name"),
                                      ({"logits_processors": ("json.dumps",)}, "required positional"),
                                      ({"logits_processors": (LARGE_ALONE,), "speculative_tokens": 2},
                                       "speculative")])
def test_bad_processors_fail_before_the_models_load(data: Path, tmp_path: Path, kw: dict, says: str) -> None:
    with pytest.raises(RastError, match=says):
        runner.EvalConfig(model="unused", data=str(data), out=str(tmp_path), **kw)
