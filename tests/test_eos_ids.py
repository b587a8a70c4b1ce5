"""Which ids end a sequence, and which of them its stop_reason names (engine/triple.py eos_token_ids), as
vLLM: the model's EOS (the tokenizer's) ends it with stop_reason None; the generation config's other eos
ids end it as stop_token_ids do, naming themselves. The generation config is generation_config's
directory's file, else that directory's config.json (HF's and vLLM's fallback to the model config).

Oracle: the same greedy request with ignore_eos (its tokens do not depend on the stop rules) cut after
the first id that should end it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rast_engine import LLM, SamplingParams

PROMPT = [5, 9, 9, 17, 4, 9]


def _model(src: Path, dst: Path, *, generation: dict | None, config_eos: object = None) -> str:
    """A copy of ``src`` with this generation_config.json (None: none) and config.json eos_token_id."""
    shutil.copytree(src, dst)
    (dst / "generation_config.json").unlink(missing_ok=True)
    if generation is not None:
        (dst / "generation_config.json").write_text(json.dumps(generation))
    if config_eos is not None:
        config = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**config, "eos_token_id": config_eos}))
    return str(dst)


def _free_run(llm: LLM, n: int = 24) -> list[int]:
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    return out[0].outputs[0].token_ids


def _llm(large: str, triple: tuple, **kw: object) -> LLM:
    return LLM(large, str(triple[1]), str(triple[2]), lam=0.7, device="cpu", dtype="float32", kv_cache_blocks=64,
               block_size=4, **kw)


@pytest.fixture(scope="module")
def setup(qwen2_triple: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple[tuple, list[int], int]:
    """The triple, its greedy tokens past every EOS, and a token of them (not the first) to call an EOS."""
    free = _free_run(_llm(str(qwen2_triple[0]), qwen2_triple))
    eos = _llm(str(qwen2_triple[0]), qwen2_triple).get_tokenizer().eos_token_id
    pick = next(t for t in free[2:] if t != eos and t not in free[:2])
    return qwen2_triple, free, pick


def _ends(free: list[int], ids: set[int]) -> list[int]:
    cut = next(i for i, t in enumerate(free) if t in ids)
    return free[:cut + 1]


@pytest.mark.parametrize("where", ["generation_config.json", "config.json without generation_config.json"])
def test_the_generation_configs_eos_ids_end_and_name_the_output(setup: tuple, tmp_path: Path, where: str) -> None:
    triple, free, pick = setup
    eos = 2  # the tokenizer's (tests/factories.py)
    if where == "generation_config.json":
        large = _model(triple[0], tmp_path / "m", generation={"eos_token_id": [eos, pick]})
    else:  # a converted checkpoint: HF and vLLM read config.json's ids when the file is missing
        large = _model(triple[0], tmp_path / "m", generation=None, config_eos=[eos, pick])
    llm = _llm(large, triple)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == _ends(free, {eos, pick}) and out.token_ids[-1] == pick
    assert (out.finish_reason, out.stop_reason) == ("stop", pick)  # vLLM: such ids are stop_token_ids
    # ignore_eos ignores them as vLLM does (it adds them to stop_token_ids only without ignore_eos)
    assert _free_run(llm) == free


def test_the_models_own_eos_names_no_stop_reason(setup: tuple, tmp_path: Path) -> None:
    triple, _, pick = setup
    llm = _llm(_model(triple[0], tmp_path / "m", generation={"eos_token_id": [2, pick]}), triple)

    def first(token: int, **kw: object) -> tuple:
        params = SamplingParams(temperature=0, max_tokens=8, logit_bias={token: 100.0}, **kw)
        out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
        return out.token_ids, out.finish_reason, out.stop_reason

    assert first(2) == ([2], "stop", None)
    assert first(pick) == ([pick], "stop", pick)
    assert first(2, stop_token_ids=[2]) == ([2], "stop", None)  # the EOS rule first, as vLLM's


def test_a_generation_config_directory_gives_its_eos_ids(setup: tuple, tmp_path: Path) -> None:
    triple, free, pick = setup
    gen_dir = tmp_path / "gen"
    gen_dir.mkdir()
    (gen_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, pick], "temperature": 0.0}))
    llm = _llm(str(triple[0]), triple, generation_config=str(gen_dir))
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == _ends(free, {2, pick}) and out.stop_reason == pick
