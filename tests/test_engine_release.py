"""Dropping the last reference to an engine frees it at once, weights and KV cache included, without waiting
for Python's cyclic GC (engine/weak_callback.py): a sweep that builds one engine after another would
otherwise hold several models' GPU memory until the GC happened to run. Oracle: weak references to the
engine's parts die as the engine's last reference is dropped, with the cyclic GC off."""
from __future__ import annotations

import gc
import os
import weakref
from typing import Any, Callable, Iterator

import pytest

from rast_engine import LLM, LLMEngine, SamplingParams

PARAMS = SamplingParams(temperature=0.8, max_tokens=6, seed=1)


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def refs(engine: LLMEngine) -> list[weakref.ref]:
    parts: list[Any] = [engine, engine.runner, engine.kv, engine.scheduler, *engine.model_set.models]
    return [weakref.ref(p) for p in parts]


def released(build: Callable[[], LLM]) -> bool:
    llm = build()
    llm.generate([[5, 17, 33, 9], [41, 8, 2]], PARAMS, use_tqdm=False)
    held = refs(llm.llm_engine)
    del llm
    return all(r() is None for r in held)


@pytest.mark.parametrize("kind", ["plain", "ahead", "speculative", "lora_modules"])
def test_del_frees_the_engine_without_the_cyclic_gc(kind: str, qwen2_triple: tuple, lora_adapters: tuple,
                                                    no_cyclic_gc: None) -> None:
    large, rl, base = map(str, qwen2_triple)
    kw = dict(block_size=4, kv_cache_blocks=64)
    build: dict[str, Callable[[], LLM]] = {
        "plain": lambda: LLM(large, rl, base, **kw),
        "ahead": lambda: LLM(large, rl, base, async_output=True, async_scheduling=True, **kw),
        "speculative": lambda: LLM(large, rl, base, speculative_tokens=2, **kw),
        "lora_modules": lambda: LLM(str(lora_adapters[0]), small_base=str(lora_adapters[1]),
                                    lora_modules={"math": lora_adapters[2]["math"]}, max_lora_rank=4, **kw),
    }
    assert released(build[kind])


def test_captured_graphs_do_not_hold_their_runner(qwen2_triple: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode graphs' stages are the runner's methods (CUDA emulator)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU runs only (Triton interpreter)")
    from cuda_emulator import emulated_cuda
    from fast_path_util import capturable_engine
    from test_emulated_fast_path import install_fast_path

    engine = capturable_engine(qwen2_triple)
    with emulated_cuda(monkeypatch):
        install_fast_path(engine.runner)
        engine.add_request("r", [5, 17, 33, 9], PARAMS)
        while engine.has_unfinished_requests():
            engine.step()
        gc.collect()
        gc.disable()
        try:
            held = refs(engine) + [weakref.ref(engine.runner.graphs)]
            del engine
            assert all(r() is None for r in held)
        finally:
            gc.enable()


@pytest.mark.gpu
def test_del_returns_the_gpu_memory_without_the_cyclic_gc(qwen2_triple: tuple, no_cyclic_gc: None) -> None:
    """Graphs on two streams, async scheduling: the engine's device memory is back in torch's allocator once
    its last reference is dropped (within 1 MiB: kernel launchers may cache small tensors per device)."""
    import torch
    from fast_path_util import SAMPLED, generate, make_engine, prompts

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    engine = make_engine(qwen2_triple, "cuda", dtype="bfloat16", attention_backend="triton")
    assert engine.runner.graphs is not None and engine.async_scheduling
    generate(engine, prompts(3, seed=1), SAMPLED)
    held = refs(engine)
    del engine
    torch.cuda.synchronize()
    assert all(r() is None for r in held) and torch.cuda.memory_allocated() - before < 2 ** 20
