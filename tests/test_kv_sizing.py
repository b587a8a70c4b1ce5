"""KV-cache sizing on CUDA without a GPU: torch.cuda's memory queries stubbed with a device's numbers.
gpu_memory_utilization is vLLM's per-instance limit: the engine's whole share of the device (weights
already held, KV cache, activations), never more than is free; without it the KV cache takes 0.9 of
what the weights left free."""
from __future__ import annotations

import gc

import pytest
import torch

from rast_engine import LLM, EngineConfig, SamplingParams
from rast_engine.errors import RastError
from rast_engine.kv_cache import (GPU_RESERVE_BYTES, activation_bytes, bytes_per_block, default_token_budget,
                                  num_kv_blocks, size_kv_cache)
from rast_engine.models.config import ModelConfig

GIB = 1 << 30
QWEN_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)


def blocks(monkeypatch: pytest.MonkeyPatch, free: int, total: int, held: int, held_before: int = 0,
           **kw: object) -> tuple[int, int]:
    """(blocks sized, the reserve and activations the cache leaves). ``held``: what the process has
    reserved now; ``held_before``: of it, what it had before this engine loaded its weights."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: held)
    configs = [ModelConfig.from_dict(QWEN_7B)]
    cfg = EngineConfig(model="m", **kw)
    got = num_kv_blocks(cfg, configs, torch.bfloat16, torch.bfloat16, torch.device("cuda"), 4096, held_before)
    overhead = GPU_RESERVE_BYTES + activation_bytes(configs, default_token_budget(4096), torch.bfloat16)
    return got, overhead


def test_gpu_memory_utilization_is_the_engines_share(monkeypatch: pytest.MonkeyPatch) -> None:
    per_block = bytes_per_block([ModelConfig.from_dict(QWEN_7B)], 16, torch.bfloat16)
    # an 80 GiB device, 16 GiB of weights held, 60 GiB free (another process holds 4): half the device
    # leaves the KV cache 40 - 16 GiB
    got, overhead = blocks(monkeypatch, free=60 * GIB, total=80 * GIB, held=16 * GIB, gpu_memory_utilization=0.5)
    assert got == (24 * GIB - overhead) // per_block
    # never past what is free: 0.95 of the device would be 60 GiB more, only 30 are free
    got, overhead = blocks(monkeypatch, free=30 * GIB, total=80 * GIB, held=16 * GIB, gpu_memory_utilization=0.95)
    assert got == (30 * GIB - overhead) // per_block
    got, overhead = blocks(monkeypatch, free=60 * GIB, total=80 * GIB, held=16 * GIB)  # the default
    assert got == (int(60 * GIB * 0.9) - overhead) // per_block
    with pytest.raises(RastError, match="less than one block.*raise gpu_memory_utilization"):  # weights exceed it
        blocks(monkeypatch, free=60 * GIB, total=80 * GIB, held=16 * GIB, gpu_memory_utilization=0.2)
    # a second engine in the process (a baseline beside RAST): its share counts its own weights only, 16
    # of the 40 GiB the process holds
    got, overhead = blocks(monkeypatch, free=40 * GIB, total=80 * GIB, held=40 * GIB, held_before=24 * GIB,
                           gpu_memory_utilization=0.45)
    assert got == (int(80 * GIB * 0.45) - 16 * GIB - overhead) // per_block


def test_gpu_memory_utilization_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 16 * GIB)
    for bad in (0, 1.5, float("nan"), True, "0.9"):
        with pytest.raises(RastError, match="gpu_memory_utilization must be"):
            EngineConfig(model="m", gpu_memory_utilization=bad)
    with pytest.raises(RastError, match="give one of"):
        EngineConfig(model="m", gpu_memory_utilization=0.9, kv_cache_blocks=64)
    with pytest.raises(RastError, match="a larger gpu_memory_utilization or a smaller max_model_len"):
        size_kv_cache(EngineConfig(model="m", gpu_memory_utilization=0.9, max_model_len=1 << 22),
                      [ModelConfig.from_dict(QWEN_7B)], torch.bfloat16, torch.bfloat16, torch.device("cuda"), 1 << 22)
    cfg = EngineConfig(model="m", gpu_memory_utilization=0.9)
    with pytest.raises(RastError, match="on a CPU give kv_cache_memory"):
        num_kv_blocks(cfg, [ModelConfig.from_dict(QWEN_7B)], torch.float32, torch.float32, torch.device("cpu"), 64)


@pytest.mark.gpu
def test_an_engine_keeps_within_its_share_of_a_gpu(qwen2_triple: tuple) -> None:
    """On a real device: with 0.3 of its memory the engine's reservations stay under 0.3 of it, and the
    cache takes most of that share (the default would take 0.9 of what is free)."""
    gc.collect()
    torch.cuda.empty_cache()
    total, base = torch.cuda.mem_get_info()[1], torch.cuda.memory_reserved()
    llm = LLM(*map(str, qwen2_triple), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3)
    llm.generate("hello world", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    held = torch.cuda.memory_reserved()
    assert 0.2 * total < held - base <= 0.3 * total
