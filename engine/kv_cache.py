"""Per-model paged KV pools over one block space.

Every model gets ``num_blocks`` blocks of ``block_size`` slots (layout in attention.metadata), so one
block id names the same tokens in every pool; one block therefore costs the sum of the models' bytes.
Small models stacked into one forward (models.stacked) share one pool of ``copies`` x num_blocks
blocks: model c of the stack keeps block b at c * num_blocks + b.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from rast_engine.config import EngineConfig
from rast_engine.errors import RastError
from rast_engine.models.config import ModelConfig
from rast_kernels.fp8_cast import byte_view

logger = logging.getLogger("rast")

CPU_DEFAULT_BYTES = 1 << 30  # cap of the CPU default
CPU_DEFAULT_MIN_TOKENS = 8192
GPU_MEMORY_FRACTION = 0.9  # of the memory free after the weights are loaded
GPU_RESERVE_BYTES = 1 << 30  # logits, sampler workspace, CUDA graphs, allocator slack
MIN_TOKEN_BUDGET = 2048  # the smallest default per-step token budget
MAX_TOKEN_BUDGET = 8192  # the largest: longer prompts are prefilled in chunks of it

KVPool = list[tuple[torch.Tensor, torch.Tensor]]  # one (k_cache, v_cache) per layer


def bytes_per_block(configs: Sequence[ModelConfig], block_size: int, dtype: torch.dtype) -> int:
    return sum(c.kv_bytes_per_block(block_size, dtype) for c in configs)


def default_token_budget(max_model_len: int) -> int:
    """Prefill tokens per step when max_num_batched_tokens is not given. Bounded, because the activations
    of a prefill of the whole budget are reserved outside the KV cache: a 128k context must not reserve
    for a 128k-token prefill when chunks of 8k keep the GPU as busy."""
    return min(max(max_model_len, MIN_TOKEN_BUDGET), MAX_TOKEN_BUDGET)


def activation_bytes(configs: Sequence[ModelConfig], tokens: int, dtype: torch.dtype) -> int:
    """Peak live activations of a prefill of ``tokens`` tokens with every model running at once (they
    may share the GPU on separate streams): residual, normed input, q/k/v, attention output and the
    feed-forward block's peak (ModelConfig.mlp_activation_width) per layer in flight. An upper estimate,
    kept out of the KV budget."""
    size = torch.empty((), dtype=dtype).element_size()
    per_token = sum(4 * c.hidden_size + c.mlp_activation_width + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                    for c in configs)
    return tokens * per_token * size


def num_kv_blocks(config: EngineConfig, configs: Sequence[ModelConfig], dtype: torch.dtype, act_dtype: torch.dtype,
                  device: torch.device, max_model_len: int, held_before: int = 0) -> int:
    """kv_cache_blocks if given, else kv_cache_memory // bytes per block, else a device default that
    leaves room for the largest prefill the token budget allows (scoring aside: it prefills whole
    sequences). ``dtype``: the cache's; ``act_dtype``: the models' activations'; ``held_before``: what
    the process had reserved on the device before this engine loaded its models (other engines')."""
    if config.kv_cache_blocks is not None:
        return config.kv_cache_blocks
    per_block = bytes_per_block(configs, config.block_size, dtype)
    if config.gpu_memory_utilization is not None and device.type != "cuda":
        raise RastError("gpu_memory_utilization sizes a CUDA device's KV cache; on a CPU give kv_cache_memory or "
                        "kv_cache_blocks (--kv-cache-blocks)")
    if config.kv_cache_memory is not None:
        memory = config.kv_cache_memory
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = config.max_num_batched_tokens or default_token_budget(max_model_len)
        if config.gpu_memory_utilization is None:
            usable = int(free * GPU_MEMORY_FRACTION)
        else:  # this engine's share so far is its weights (vLLM's per-instance limit); never past what is free
            weights = torch.cuda.memory_reserved(device) - held_before
            usable = min(int(total * config.gpu_memory_utilization) - weights, free)
        memory = usable - GPU_RESERVE_BYTES - activation_bytes(configs, budget, act_dtype)
    else:
        tokens = max(4 * max_model_len, CPU_DEFAULT_MIN_TOKENS)
        memory = min(CPU_DEFAULT_BYTES, tokens * per_block // config.block_size)
    blocks = memory // per_block
    if blocks <= 0:
        raise RastError(f"the KV cache gets {max(memory, 0)} bytes, less than one block "
                        f"({per_block} bytes for {config.block_size} tokens over all models)"
                        + ("; raise gpu_memory_utilization" if config.gpu_memory_utilization is not None else ""))
    return int(blocks)


def every_model(configs: Sequence[ModelConfig], copies: Sequence[int]) -> list[ModelConfig]:
    """One config per model whose KV is cached: a pool of ``n`` stacked copies counts ``n`` times."""
    return [c for c, n in zip(configs, copies) for _ in range(n)]


def size_kv_cache(config: EngineConfig, configs: Sequence[ModelConfig], dtype: torch.dtype, act_dtype: torch.dtype,
                  device: torch.device, max_model_len: int, held_before: int = 0) -> tuple[int, int]:
    """(num_blocks, max_model_len): max_model_len capped at the cache's capacity unless the user set it,
    in which case a cache too small for one sequence of that length is an error. ``dtype``: the cache's."""
    num_blocks = num_kv_blocks(config, configs, dtype, act_dtype, device, max_model_len, held_before)
    capacity = num_blocks * config.block_size
    if capacity >= max_model_len:
        return num_blocks, max_model_len
    if config.max_model_len is not None:
        more = "a larger gpu_memory_utilization" if config.gpu_memory_utilization is not None else \
            "more kv_cache_blocks / kv_cache_memory"
        raise RastError(f"the KV cache holds {capacity} tokens, fewer than max_model_len={max_model_len}; "
                        f"give {more} or a smaller max_model_len")
    logger.warning("max_model_len capped at the KV capacity: %d tokens", capacity)
    return num_blocks, capacity


class KVCache:
    def __init__(self, configs: Sequence[ModelConfig], num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, copies: Optional[Sequence[int]] = None) -> None:
        """One pool per config, holding copies[i] (default 1) models' blocks of that architecture."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.copies = list(copies) if copies is not None else [1] * len(configs)
        if len(self.copies) != len(configs) or min(self.copies, default=1) < 1:
            raise ValueError(f"copies must give a positive count per config, got {copies}")
        self.bytes = num_blocks * bytes_per_block(every_model(configs, self.copies), block_size, dtype)
        try:  # zero-filled: slots past a context are masked, but 0 * NaN garbage would still poison a matmul
            self.pools: list[KVPool] = [
                [(torch.zeros(c.kv_cache_shape(n * num_blocks, block_size, dtype), dtype=dtype, device=device),
                  torch.zeros(c.kv_cache_shape(n * num_blocks, block_size, dtype), dtype=dtype, device=device))
                 for _ in range(c.num_layers)]
                for c, n in zip(configs, self.copies)
            ]
        except (torch.OutOfMemoryError, RuntimeError) as e:  # an explicit kv_cache_blocks / kv_cache_memory
            raise RastError(f"the KV cache ({num_blocks} blocks of {block_size} tokens, {self.bytes / 2**30:.1f} GiB) "
                            f"cannot be allocated on {device}: {str(e).splitlines()[0]}; give fewer "
                            "kv_cache_blocks or less kv_cache_memory") from None

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def copy_blocks(self, copies: Sequence[tuple[int, int]], device: Optional[torch.device] = None) -> None:
        """Copy-on-write: block dst takes block src's K/V in every layer of every model."""
        if not copies:
            return
        dev = device or self.pools[0][0][0].device
        pairs = torch.tensor(copies, dtype=torch.int64)
        if dev.type == "cuda":  # pinned and queued: torch.tensor(..., device=cuda) would sync the stream
            pairs = pairs.pin_memory()
        src, dst = pairs.to(dev, non_blocking=True).unbind(1)
        for pool, n in zip(self.pools, self.copies):
            shift = torch.arange(n, device=dev)[:, None] * self.num_blocks  # every model's copy of the block
            src_n, dst_n = (src + shift).flatten(), (dst + shift).flatten()
            for cache in (c for layer in pool for c in layer):
                raw = byte_view(cache)
                raw.index_copy_(0, dst_n, raw.index_select(0, src_n))
