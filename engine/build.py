"""LLMEngine's parts, built from an EngineConfig: the model set (small models stacked into one forward
where they can be), the KV cache sized to the memory left, the block manager, the scheduler and the
model runner (which captures its CUDA graphs as it is built). The order matters on CUDA: the KV cache
is sized after the models are stacked and the allocator's cache is emptied, and the graphs are
captured once the cache exists."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from rast_engine.attention import get_attention_backend
from rast_engine.block_manager import BlockManager
from rast_engine.config import EngineConfig
from rast_engine.cuda_graph import capture_safe
from rast_engine.errors import RastError
from rast_engine.kv_cache import KVCache, default_token_budget, every_model, size_kv_cache
from rast_engine.model_runner import ModelRunner
from rast_engine.models.layer_ops import get_layer_ops
from rast_engine.models.skinny import use_skinny_linears
from rast_engine.models.stacked import forward_units
from rast_engine.scheduler import Scheduler
from rast_engine.triple import ModelSet, load_model_set

logger = logging.getLogger("rast")


@dataclass
class EngineParts:
    model_set: ModelSet
    max_model_len: int
    kv: KVCache
    block_manager: BlockManager
    scheduler: Scheduler
    runner: ModelRunner


def build_parts(config: EngineConfig, device: torch.device, async_scheduling: bool, t0: float) -> EngineParts:
    """``t0``: when the engine started loading (for the log line)."""
    attention = get_attention_backend(config.attention_backend, device, config.block_size, config.kv_cache_dtype)
    held_before = torch.cuda.memory_reserved(device) if device.type == "cuda" else 0  # other engines' memory
    ms = load_model_set(config, device, attention, get_layer_ops(config.layer_ops, device))
    dtype = ms.models[0].dtype
    model_max = min(c.max_context for c in ms.configs)
    if config.max_model_len is not None and config.max_model_len > model_max:
        raise RastError(f"max_model_len={config.max_model_len} exceeds the models' context "
                        f"({model_max}: max_position_embeddings, stretched by a yarn or linear rope scaling, one "
                        "chunk where the checkpoint relies on dual chunk attention)")
    units, roles = forward_units(ms.models, config.stack_small_models)
    if config.decode_linear == "skinny":
        use_skinny_linears(units[0])
    if config.speculative_tokens and 0 in roles[1:]:
        raise RastError("speculative decoding drafts with the small models alone, and the large model also "
                        f"fills a small role ({', '.join(r for r, i in zip(ms.roles[1:], roles[1:]) if i == 0)}): "
                        "give small models that are not the large one, or speculative_tokens=0")
    if device.type == "cuda":
        # stacking freed the small models' first copies into the allocator's cache; mem_get_info would
        # count them as used and the KV cache would shrink by the small models' size
        torch.cuda.empty_cache()
    configs, copies = [u.config for u in units], [u.copies for u in units]  # one KV per model, not per role
    kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else dtype
    num_blocks, max_len = size_kv_cache(config, every_model(configs, copies), kv_dtype, dtype, device,
                                        config.max_model_len or model_max, held_before)
    # a prompt (or a preempted sequence's recompute) longer than the budget is prefilled in chunks
    budget = config.max_num_batched_tokens or default_token_budget(max_len)
    kv = KVCache(configs, num_blocks, config.block_size, kv_dtype, device, copies=copies)
    block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
    scheduler = Scheduler(block_manager, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=budget,
                          max_model_len=max_len, eos_token_ids=ms.eos_token_ids, named_eos_ids=ms.named_eos_ids,
                          lookahead=config.speculative_tokens, policy=config.scheduling_policy)
    eager = config.enforce_eager or device.type != "cuda"
    if not eager and not capture_safe(attention.name, config.speculative_tokens > 0):
        logger.warning("attention backend %r reads lengths on the host in its %s path and cannot be captured "
                       "in a CUDA graph; %s eagerly", attention.name,
                       "prefill (a speculative round's verify)" if config.speculative_tokens else "decode",
                       "speculative rounds run" if config.speculative_tokens else "decoding")
        eager = True
    runner = ModelRunner(units, roles, kv, ms.vocab_size, config.block_size, device, enforce_eager=eager,
                         model_streams=config.model_streams, max_num_seqs=config.max_num_seqs,
                         max_model_len=max_len, graph_max_batch=config.cuda_graph_max_batch,
                         speculative_tokens=config.speculative_tokens, speculative_draft=config.speculative_draft,
                         speculative_method=config.speculative_method,
                         raw_logprobs=config.logprobs_mode == "raw_logprobs")
    logger.info("loaded %d model(s) (%s) on %s in %s in %.2f s; vocab V=%d", len(ms.models), ", ".join(ms.roles),
                device, str(dtype).replace("torch.", ""), time.perf_counter() - t0, ms.vocab_size)
    logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB over %d pools); max_model_len %d",
                num_blocks, config.block_size, kv.capacity_tokens, kv.bytes / 2**20, len(kv.pools), max_len)
    graphs = runner.graphs or runner.round_graphs
    logger.info("backends: attention=%s sampler=%s; %s %s, model streams %s, async scheduling %s; "
                "small models: %s%s", attention.name, runner.sampler,
                "speculative rounds" if config.speculative_tokens else "decode", "eager" if graphs is None else
                f"in CUDA graphs up to batch {graphs.buckets[-1]}" + (
                    ", eager above" if graphs.buckets[-1] < config.max_num_seqs else ""),
                "on" if runner.streams.concurrent else "off", "on" if async_scheduling else "off",
                " + ".join(f"{u.copies} stacked" if u.copies > 1 else "1" for u in units[1:]) or "none",
                f"; speculative: {config.speculative_tokens} {config.speculative_draft} drafts a round, "
                f"{config.speculative_method}"
                if config.speculative_tokens else "")
    return EngineParts(ms, max_len, kv, block_manager, scheduler, runner)
