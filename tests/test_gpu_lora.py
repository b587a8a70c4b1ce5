"""LoRA adapters chosen per request on a real GPU (`gpu` tests): the slots' masks and GEMMs inside the
captured decode graphs, on two streams, against the CPU float32 engine; adapters loaded after the capture
too. The adapters are written as PEFT writes them (bench/decode_configs.write_adapter), so peft, absent
on the GPU image, is not needed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fast_path_util import make_engine, prompts
from rast_engine import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
CHOICES = ["a", None, "b", "a", "b", None]


@pytest.fixture(scope="module")
def adapters(qwen2_triple: tuple, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from bench.decode_configs import write_adapter

    base = Path(qwen2_triple[2])
    cfg = json.loads((base / "config.json").read_text())
    root = tmp_path_factory.mktemp("gpu-lora")
    out = {}
    for seed, (name, rank) in enumerate((("a", 4), ("b", 2))):
        (root / name).mkdir()
        write_adapter(root / name, base, cfg, rank, seed=seed)
        out[name] = str(root / name)
    return out


def _decode(engine, choices: list) -> list[list[int]]:  # noqa: ANN001 - an LLMEngine
    for i, (p, lora) in enumerate(zip(prompts(len(choices), seed=41), choices)):
        engine.add_request(f"r{i}", p, GREEDY, lora_request=lora)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return [done[f"r{i}"] for i in range(len(choices))]


@pytest.mark.gpu
@pytest.mark.parametrize("loaded_later", [False, True])
def test_gpu_adapters_per_request_equal_cpu_float32(qwen2_triple: tuple, adapters: dict[str, str],
                                                    loaded_later: bool) -> None:
    large, _, base = qwen2_triple
    triple = (large, None, base)
    slots = dict(lora_modules={}, max_loras=2, max_lora_rank=4) if loaded_later else dict(lora_modules=adapters)
    cpu = make_engine(triple, "cpu", dtype="float32", small_rl=None, lora_modules=adapters)
    gpu = make_engine(triple, "cuda", dtype="float32", attention_backend="triton", small_rl=None, **slots)
    assert gpu.runner.graphs is not None and gpu.runner.streams.concurrent
    if loaded_later:  # after the graphs were captured: the slots are written in place
        for name, path in adapters.items():
            gpu.load_lora_adapter(name, path)
    assert _decode(gpu, CHOICES) == _decode(cpu, CHOICES)


@pytest.mark.gpu
def test_gpu_adapter_load_queues_behind_the_device_without_a_host_sync(qwen2_triple: tuple,
                                                                      adapters: dict[str, str]) -> None:
    """A load while the device is busy returns before the device's work is done (its copies are queued on
    the stream, from page-locked deltas), and the next steps read the adapter it wrote."""
    import torch

    large, _, base = qwen2_triple
    triple = (large, None, base)
    cpu = make_engine(triple, "cpu", dtype="float32", small_rl=None, lora_modules=adapters)
    gpu = make_engine(triple, "cuda", dtype="float32", attention_backend="triton", small_rl=None, lora_modules={},
                      max_loras=2, max_lora_rank=4)
    for name, path in adapters.items():
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # about a second of a spinning kernel ahead of the load's copies
        busy = torch.cuda.Event()
        busy.record()
        gpu.load_lora_adapter(name, path)
        assert not busy.query(), "the load waited for the device"
        kept = gpu.model_set.lora.host[str(Path(path).resolve())][1]  # the host copy a reload reads: locked
        assert all(d.a.is_pinned() and d.b.is_pinned() for d in kept)
    assert _decode(gpu, CHOICES) == _decode(cpu, CHOICES)


@pytest.mark.gpu
def test_gpu_waiting_adapter_loads_between_steps_as_each_alone(qwen2_triple: tuple, adapters: dict[str, str]) -> None:
    """One slot and both adapters by path: b's requests wait, and the scheduler loads b while a step runs
    ahead (async scheduling), with no host sync; every request's tokens equal the CPU float32 engine's."""
    from rast_engine import LoRARequest

    large, _, base = qwen2_triple
    triple = (large, None, base)
    requests = {n: LoRARequest(n, i + 1, p) for i, (n, p) in enumerate(adapters.items())}
    choices = [requests[c] if c else None for c in CHOICES]
    cpu = make_engine(triple, "cpu", dtype="float32", small_rl=None, lora_modules=adapters)
    gpu = make_engine(triple, "cuda", dtype="float32", attention_backend="triton", small_rl=None, lora_modules={},
                      max_loras=1, max_lora_rank=4)
    assert _decode(gpu, choices) == _decode(cpu, CHOICES)


@pytest.mark.gpu
def test_gpu_adapter_saved_with_the_embedding_copy_peft_writes(qwen2_triple: tuple, adapters: dict[str, str],
                                                              tmp_path: Path) -> None:
    """An adapter holding a copy of the base's embedding (PEFT's save_embedding_layers) is checked against
    the weight on the GPU and decodes as without it (the check compared a CPU tensor with a CUDA one)."""
    import shutil

    from safetensors.torch import load_file, save_file

    large, _, base = qwen2_triple
    copy = tmp_path / "a"
    shutil.copytree(adapters["a"], copy)
    weights = load_file(str(copy / "adapter_model.safetensors"))
    embedding = load_file(str(next(Path(base).glob("*.safetensors"))))["model.embed_tokens.weight"]
    weights["base_model.model.model.embed_tokens.weight"] = embedding
    save_file(weights, str(copy / "adapter_model.safetensors"))
    triple = (large, None, base)
    cpu = make_engine(triple, "cpu", dtype="float32", small_rl=None, lora_modules={"a": adapters["a"]})
    gpu = make_engine(triple, "cuda", dtype="float32", attention_backend="triton", small_rl=None,
                      lora_modules={"a": str(copy)})
    choices = ["a", None, "a"]
    assert _decode(gpu, choices) == _decode(cpu, choices)
