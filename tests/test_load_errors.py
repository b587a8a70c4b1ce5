"""Model directories and engine arguments the engine cannot use fail at construction with a RastError
(ModelLoadError for a directory) that names the model and the problem: never a bare KeyError,
ZeroDivisionError or a library's own exception from deep inside loading."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import rast_kernels.launch
from rast_engine import LLM
from rast_engine.errors import ModelLoadError, RastError


def test_load_errors_are_clear(qwen2_triple: tuple, tmp_path: Path) -> None:
    large, rl, base = qwen2_triple
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nowhere"))
    with pytest.raises(RastError, match="together"):
        LLM(str(large), str(rl))
    broken = Path(shutil.copytree(rl, tmp_path / "broken"))
    weights = load_file(str(broken / "model.safetensors"))
    del weights["model.norm.weight"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"small_rl.*model\.norm\.weight"):
        LLM(str(large), str(broken), str(base))
    other = Path(shutil.copytree(base, tmp_path / "other_tok"))
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_tokens(["zzqq"])
    tok.save_pretrained(str(other))
    with pytest.raises(ModelLoadError, match=r"small_base.*differs.*zzqq"):
        LLM(str(large), str(rl), str(other))




def _with_config(src: Path, dst: Path, edit: dict | list) -> str:
    """A copy of model directory ``src`` whose config.json is changed by ``edit`` (a list replaces it)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit if isinstance(edit, list) else {**cfg, **edit}))
    return str(dst)


@pytest.mark.parametrize("edit, match", [
    ([1, 2], "must hold a JSON object"),
    ({"num_attention_heads": 0}, "invalid value"),
    ({"hidden_size": None}, "invalid value"),
    ({"intermediate_size": "big"}, "invalid value"),
    ({"eos_token_id": "x"}, "eos_token_id"),
    ({"quantization_config": {"quant_method": "fp8"}}, "pre-quantized.*'fp8'"),
    ({"rope_scaling": "yarn"}, "rope_scaling must be an object"),
])
def test_bad_config_values_name_the_problem(qwen2_triple: tuple, tmp_path: Path, edit: dict | list,
                                            match: str) -> None:
    large = qwen2_triple[0]
    bad = _with_config(large, tmp_path / "bad", edit)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # config.json's eos is read without a tokenizer
        (tmp_path / "bad" / f).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match=match):
        LLM(bad, device="cpu", load_format="dummy" if "eos" in match else "auto")


def test_corrupt_weights_bad_devices_and_backends_are_rast_errors(qwen2_triple: tuple, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    large = qwen2_triple[0]
    corrupt = Path(shutil.copytree(large, tmp_path / "corrupt"))
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ModelLoadError, match="corrupt.*not a readable safetensors file"):
        LLM(str(corrupt), device="cpu")
    with pytest.raises(RastError, match="device must be"):
        LLM(str(large), device="meta")
    monkeypatch.setattr(rast_kernels.launch, "interpreting", lambda: False)  # as on a CPU machine outside tests
    with pytest.raises(RastError, match="'triton' needs a CUDA device"):
        LLM(str(large), device="cpu", attention_backend="triton")


def test_bad_shard_indexes_unreadable_configs_and_non_float_weights(qwen2_triple: tuple, tmp_path: Path) -> None:
    """Each a ModelLoadError naming the file or tensor (they escaped as TypeError, AttributeError,
    UnicodeDecodeError; an FP8 or integer tensor was cast to the model dtype silently)."""
    import torch

    large = qwen2_triple[0]
    for n, index in enumerate(([1, 2], {"weight_map": None}, {"weight_map": ["model.safetensors"]})):
        bad = Path(shutil.copytree(large, tmp_path / f"index{n}"))
        (bad / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(ModelLoadError, match="not a valid safetensors index"):
            LLM(str(bad), device="cpu")
    wrong = Path(shutil.copytree(large, tmp_path / "wrong_shard"))
    save_file({"x": torch.zeros(1)}, str(wrong / "other.safetensors"), metadata={"format": "pt"})
    names = load_file(str(wrong / "model.safetensors"))
    index = {name: "other.safetensors" if name == "model.norm.weight" else "model.safetensors" for name in names}
    (wrong / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    with pytest.raises(ModelLoadError, match=r"lists tensor model\.norm\.weight in other\.safetensors"):
        LLM(str(wrong), device="cpu")
    bad = Path(shutil.copytree(large, tmp_path / "latin1"))
    (bad / "config.json").write_bytes((bad / "config.json").read_bytes().replace(b'"qwen2"', b'"qw\xe9n2"'))
    with pytest.raises(ModelLoadError, match="config.json.*not valid JSON"):
        LLM(str(bad), device="cpu")
    for dtype in (torch.float8_e4m3fn, torch.int8):
        bad = Path(shutil.copytree(large, tmp_path / f"w{dtype}"))
        weights = load_file(str(bad / "model.safetensors"))
        weights["model.norm.weight"] = weights["model.norm.weight"].to(dtype)
        save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ModelLoadError, match=r"model\.norm\.weight is (F8_E4M3|I8)"):
            LLM(str(bad), device="cpu")


def test_a_non_finite_weight_under_fp8_names_the_tensor(qwen2_triple: tuple, tmp_path: Path) -> None:
    bad = Path(shutil.copytree(qwen2_triple[0], tmp_path / "inf"))
    weights = load_file(str(bad / "model.safetensors"))
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"down_proj\.weight cannot be quantised"):
        LLM(str(bad), device="cpu", quantization="fp8")
