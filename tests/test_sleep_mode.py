"""vLLM's sleep mode (LLMEngine.sleep / wake_up, engine/sleep_mode.py). Oracles: the engine's own tokens
before the sleep (a level-1 sleep is invisible), an engine built on the checkpoints written after a sleep
from the start, and the storages' sizes (the memory is given back)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rast_engine import LLM, LLMEngine
from rast_engine.errors import RastError
from test_weight_updates import GREEDY, KW, PROMPTS, SAMPLED, another_rl, tokens, unchanged, weights


def held_bytes(llm: LLM | LLMEngine) -> int:
    engine = llm.llm_engine if isinstance(llm, LLM) else llm
    tensors = [t for m in engine.model_set.models for t in (*m.parameters(), *m.buffers())]
    tensors += [t for pool in engine.kv.pools for kv in pool for t in kv]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.fixture(scope="module")
def paths(qwen2_triple: tuple) -> list[str]:
    return list(map(str, qwen2_triple))


def test_level_1_gives_the_memory_back_and_wakes_to_the_same_tokens(paths: list[str]) -> None:
    llm = LLM(*paths, **KW)
    before = [tokens(llm, p) for p in (GREEDY, SAMPLED)]
    full = held_bytes(llm)
    llm.sleep()
    engine = llm.llm_engine
    assert engine.is_sleeping() and held_bytes(llm) == 0 and not engine.scheduler.bm.cached
    with pytest.raises(RastError, match="sleeps"):
        tokens(llm)
    llm.sleep(level=2)  # asleep already: nothing happens
    llm.wake_up()
    assert not engine.is_sleeping() and held_bytes(llm) == full
    assert all(not k.any() and not v.any() for pool in engine.kv.pools for k, v in pool)
    assert [tokens(llm, p) for p in (GREEDY, SAMPLED)] == before


def test_a_wake_without_room_is_refused_and_can_be_retried(paths: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    llm = LLM(*paths, **KW)
    before = tokens(llm, SAMPLED)
    llm.sleep()
    resize, refusals = torch.UntypedStorage.resize_, []

    def full_device(storage: torch.UntypedStorage, nbytes: int) -> torch.UntypedStorage:
        if nbytes and len(refusals) < 1:
            refusals.append(nbytes)
            raise torch.OutOfMemoryError("no room (injected)")
        return resize(storage, nbytes)

    monkeypatch.setattr(torch.UntypedStorage, "resize_", full_device)
    with pytest.raises(RastError, match="no device memory for the weights"):
        llm.wake_up()
    assert llm.llm_engine.is_sleeping() and refusals
    llm.wake_up()
    assert tokens(llm, SAMPLED) == before


def test_weights_first_then_a_load_then_the_kv_cache(paths: list[str], qwen2_triple: tuple, tmp_path: Path) -> None:
    """vLLM's order for a trainer short of memory: the weights wake, a new R is written, then the KV cache."""
    rl2 = str(another_rl(qwen2_triple, "qwen2", tmp_path))
    llm = LLM(*paths, **KW)
    tokens(llm)
    llm.sleep()
    with pytest.raises(RastError, match="wake_up"):
        llm.load_weights(path=rl2)
    llm.wake_up(["weights"])
    assert llm.load_weights(path=rl2) > 0
    with pytest.raises(RastError, match="kv_cache"):
        tokens(llm)
    llm.wake_up(["kv_cache"])
    assert tokens(llm) == tokens(LLM(paths[0], rl2, paths[2], **KW))


def test_level_2_serves_only_once_every_weight_is_written(paths: list[str]) -> None:
    llm = LLM(*paths, **KW)
    want = tokens(llm)
    named = [(n, p.narrow(0, start, rows).clone()) for n, (p, start, rows) in
             llm.llm_engine.model_set.models[1].weight_map().items()]
    llm.sleep(level=2)
    llm.wake_up()
    with pytest.raises(RastError, match=r"\['model', 'small_rl', 'small_base'\]"):
        tokens(llm)
    llm.load_weights(path=paths[0], role="model")
    llm.load_weights(named[:-1])
    llm.load_weights(path=paths[2], role="small_base")
    with pytest.raises(RastError, match=r"\['small_rl'\]"):
        tokens(llm)
    llm.load_weights(named[-1:])
    assert tokens(llm) == want


def test_what_cannot_sleep_is_refused_and_changes_nothing(paths: list[str], lora_adapters: tuple) -> None:
    llm = LLM(*paths, **KW)
    before, full = weights(llm), held_bytes(llm)
    llm.llm_engine.add_request("live", PROMPTS[0], GREEDY)
    for kw in (dict(level=1), dict(level=3)):
        with pytest.raises(RastError):
            llm.sleep(**kw)
    with pytest.raises(RastError, match="tags"):
        llm.wake_up(["weight"])
    assert not llm.llm_engine.is_sleeping() and held_bytes(llm) == full and unchanged(before, llm)
    large, base, modules = lora_adapters
    lora = LLM(str(large), small_base=str(base), lora_modules={"math": modules["math"]}, max_lora_rank=4, **KW)
    with pytest.raises(RastError, match="level 1"):
        lora.sleep(level=2)
    assert not lora.llm_engine.is_sleeping()


def test_nothing_touches_sleeping_weights(lora_adapters: tuple) -> None:
    """Adapter loads and unloads write slots, scoring runs the models: refused while the weights sleep; a
    request naming a loaded adapter waits, and runs as before once awake."""
    from rast_engine import LoRARequest

    large, base, modules = lora_adapters
    llm = LLM(str(large), small_base=str(base), lora_modules={"math": modules["math"]}, max_loras=2,
              max_lora_rank=4, **KW)
    engine = llm.llm_engine
    want = llm.generate([PROMPTS[0]], GREEDY, lora_request="math", use_tqdm=False)[0].outputs[0].token_ids
    llm.sleep()
    refused = [lambda: engine.load_lora_adapter("code", modules["code"]),
               lambda: engine.unload_lora_adapter("math"),
               lambda: engine.add_request("new", PROMPTS[0], GREEDY,
                                          lora_request=LoRARequest("code", 2, modules["code"])),
               lambda: engine.score([PROMPTS[0]])]
    for call in refused:
        with pytest.raises(RastError, match="sleep"):
            call()
    assert engine.lora_adapters() == {"math": modules["math"]} and not engine.groups
    engine.add_request("queued", PROMPTS[0], GREEDY, lora_request="math")
    llm.wake_up()
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].outputs[0].token_ids == want


def test_graphs_are_captured_again_on_waking(qwen2_triple: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tensors move while the engine sleeps: its graphs are dropped and captured again (CUDA emulator),
    and replaying them decodes as before."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU runs only (Triton interpreter)")
    from cuda_emulator import emulated_cuda
    from fast_path_util import capturable_engine, prompts
    from test_emulated_fast_path import SAMPLED as EMULATED, generate_all, install_fast_path

    engine = capturable_engine(qwen2_triple)
    batch = prompts(3, seed=3)
    with emulated_cuda(monkeypatch) as emu:
        install_fast_path(engine.runner)
        want = generate_all(engine, batch, EMULATED)
        engine.sleep()
        assert not engine.runner.graphs.graphs
        engine.wake_up()
        assert set(engine.runner.graphs.graphs) == {4}
        replays = emu.replays
        assert generate_all(engine, batch, EMULATED) == want and emu.replays > replays


@pytest.mark.gpu
def test_sleep_gives_the_device_memory_back(qwen2_triple: tuple) -> None:
    from fast_path_util import SAMPLED as FAST, generate, make_engine, prompts

    engine = make_engine(qwen2_triple, "cuda", dtype="bfloat16", attention_backend="triton")
    batch = prompts(3, seed=2)
    want = generate(engine, batch, FAST)
    torch.cuda.synchronize()
    awake, held = torch.cuda.memory_allocated(), held_bytes(engine)
    engine.sleep()
    assert awake - torch.cuda.memory_allocated() >= held > engine.kv.bytes
    engine.wake_up()
    assert engine.runner.graphs.graphs and generate(engine, batch, FAST) == want
