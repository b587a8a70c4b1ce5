"""Shared by the fast-path tests (test_fast_path, test_gpu_engine, the emulated ones): a tiny engine with
small blocks, random prompts, and a loop that runs requests to completion."""
from __future__ import annotations

import random

from rast_engine import EngineConfig, LLMEngine, SamplingParams

LAM = 0.6
BS = 4  # block size: small, so short sequences span several blocks


def make_engine(triple: tuple, device: str = "cpu", **kw) -> LLMEngine:
    large, rl, base = map(str, triple)
    cfg = dict(model=large, small_rl=rl, small_base=base, lam=LAM, device=device, block_size=BS,
               kv_cache_blocks=256, max_num_seqs=16, max_model_len=128, seed=3)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


def capturable_engine(triple: tuple, **kw) -> LLMEngine:
    """The cheapest engine whose decode step the CUDA emulator can capture, for tests of what happens around
    graphs rather than in their kernels: Triton attention (the torch backend reads lengths on the host),
    torch layer ops and sampler (the interpreter would take most of the time)."""
    engine = make_engine(triple, **{"max_num_seqs": 8, "attention_backend": "triton", "layer_ops": "torch", **kw})
    engine.runner.sampler = "torch"
    return engine


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 90) for _ in range(rng.randrange(3, 11))] for _ in range(n)]


def generate(engine: LLMEngine, batch: list[list[int]], params: SamplingParams, logprobs: bool = False,
             every: bool = False) -> list:
    """Each prompt's tokens (with ``logprobs``: tokens and per-token logprobs; with ``every``: every
    sample's tokens)."""
    ids = [f"g{random.getrandbits(40)}" for _ in batch]
    for rid, p in zip(ids, batch):
        engine.add_request(rid, p, params)
    done: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                done[out.request_id] = ([x.token_ids for x in out.outputs] if every
                                        else (c.token_ids, c.logprobs) if logprobs else c.token_ids)
    return [done[r] for r in ids]


GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, max_tokens=10, ignore_eos=True, seed=11)

