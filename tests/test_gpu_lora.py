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
