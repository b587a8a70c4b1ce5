"""max_cpu_loras (vLLM's): adapters read by a LoRARequest's path stay in host memory, least recently read
dropped first, so one evicted from its slot reloads without reading its files, unless they changed.
Oracles: which adapters were read from disk (read_adapter counted), and each request's tokens as its adapter
alone decodes them (test_lora_queue._want)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rast_engine import LLM, EngineConfig, LoRARequest
from rast_engine.errors import RastError
from test_engine import PROMPTS
from test_lora_modules import GREEDY, KW
from test_lora_queue import _want

pytest.importorskip("peft")


def _counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import rast_engine.lora_registry as registry_module

    reads: list[str] = []
    read = registry_module.read_adapter
    monkeypatch.setattr(registry_module, "read_adapter", lambda name, *a: reads.append(name) or read(name, *a))
    return reads


def _generate(llm: LLM, request: LoRARequest, prompt: object) -> list[int]:
    return llm.generate([prompt], GREEDY, use_tqdm=False, lora_request=request)[0].outputs[0].token_ids


@pytest.mark.parametrize("host_copies, rereads", [(2, ["m", "c"]), (1, ["m", "c", "m"])])
def test_an_evicted_adapter_reloads_from_its_host_copy(lora_adapters: tuple, monkeypatch: pytest.MonkeyPatch,
                                                       host_copies: int, rereads: list[str]) -> None:
    """One slot, m then c then m again by path: with two host copies m's second load reads nothing; with one,
    c's read dropped m's copy."""
    large, base, modules = lora_adapters
    reads = _counting_reads(monkeypatch)
    llm = LLM(str(large), small_base=str(base), max_loras=1, max_lora_rank=4, max_cpu_loras=host_copies, **KW)
    m, c = LoRARequest("m", 1, modules["math"]), LoRARequest("c", 2, modules["code"])
    for request, name, prompt in ((m, "math", PROMPTS[0]), (c, "code", PROMPTS[1]), (m, "math", PROMPTS[2])):
        assert _generate(llm, request, prompt) == _want(lora_adapters, name, GREEDY, prompt)
    assert reads == rereads and llm.llm_engine.model_set.lora.slots == ["m"]


def test_an_adapter_saved_over_is_read_again(lora_adapters: tuple, monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    """The host copy holds the files' sizes and times: code's adapter saved over math's directory (a
    retrained adapter) is read again and decodes as code, not as the stale copy."""
    large, base, modules = lora_adapters
    shutil.copytree(modules["math"], tmp_path / "rl")
    reads = _counting_reads(monkeypatch)
    llm = LLM(str(large), small_base=str(base), max_loras=1, max_lora_rank=4, max_cpu_loras=2, **KW)
    assert _generate(llm, LoRARequest("a", 1, str(tmp_path / "rl")), PROMPTS[0]) == \
        _want(lora_adapters, "math", GREEDY, PROMPTS[0])
    _generate(llm, LoRARequest("c", 2, modules["code"]), PROMPTS[1])  # evicts a
    shutil.rmtree(tmp_path / "rl")
    shutil.copytree(modules["code"], tmp_path / "rl")
    assert _generate(llm, LoRARequest("a", 1, str(tmp_path / "rl")), PROMPTS[0]) == \
        _want(lora_adapters, "code", GREEDY, PROMPTS[0])
    assert reads == ["a", "c", "a"]


def test_max_cpu_loras_is_checked(lora_adapters: tuple) -> None:
    large, base, modules = lora_adapters
    with pytest.raises(RastError, match="must be at least max_loras"):
        EngineConfig(model=str(large), small_base=str(base), max_loras=2, max_cpu_loras=1)
    with pytest.raises(RastError, match="max_cpu_loras is about LoRA slots"):
        EngineConfig(model=str(large), max_cpu_loras=2)
    with pytest.raises(RastError, match="max_cpu_loras"):
        EngineConfig(model=str(large), small_base=str(base), max_loras=1, max_cpu_loras=0)
