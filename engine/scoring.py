"""Teacher-forced scoring: batched prefills over the paged cache returning every position's scores.

Sequences are packed into prefills under the step token budget and the free blocks; their blocks are
taken without prefix-cache hits (every position's logits are needed) and freed right after. A sequence
is never chunked: one longer than the budget is scored alone in one prefill, beyond the activation
memory that kv_cache reserves for the budget.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rast_engine.errors import RastError
from rast_engine.lora_modules import LoraChoice
from rast_engine.outputs import ScoreOutput
from rast_engine.sampling_params import SamplingParams
from rast_engine.sequence import Sequence, SequenceGroup

if TYPE_CHECKING:
    from rast_engine.llm_engine import LLMEngine

OUTPUTS = ("logits", "logprobs")


def _validate(engine: LLMEngine, sequences: list[list[int]], output: str) -> None:
    if output not in OUTPUTS:
        raise RastError(f"output must be one of {OUTPUTS}, got {output!r}")
    if not isinstance(sequences, (list, tuple)):
        raise RastError("sequences must be a list of token-id lists")
    for i, ids in enumerate(sequences):
        if not isinstance(ids, (list, tuple)) or not ids or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise RastError(f"sequences[{i}] must be a non-empty list of token ids")
        if len(ids) > engine.max_model_len:
            raise RastError(f"sequences[{i}] has {len(ids)} tokens; max_model_len is {engine.max_model_len}")
        bad = [t for t in ids if not 0 <= t < engine.vocab_size]
        if bad:
            raise RastError(f"sequences[{i}] has token ids {bad[:5]} outside [0, {engine.vocab_size})")


def _finish(per_model: list[torch.Tensor], weights: list[float], vocab: int, output: str) -> ScoreOutput:
    """[L, width] per model -> ScoreOutput with Eq. 3 combined in float32 on the raw logits."""
    logits = [t[:, :vocab].float().cpu() for t in per_model]
    combined = logits[0].clone()
    for w, rl, base in zip(weights, logits[1::2], logits[2::2]):
        combined += w * (rl - base)
    if output == "logprobs":
        logits = [torch.log_softmax(t, dim=-1) for t in logits]
        combined = torch.log_softmax(combined, dim=-1)
    return ScoreOutput(large=logits[0], deltas=list(zip(logits[1::2], logits[2::2])), combined=combined)


def score_sequences(engine: LLMEngine, sequences: list[list[int]], output: str,
                    lora_request: LoraChoice = None) -> list[ScoreOutput]:
    _validate(engine, sequences, output)
    # scoring runs now, outside the steps: an adapter that finds no slot is refused, it cannot wait, and so is
    # one that would take a slot the requests waiting for adapter loads need (LoraRegistry.choose)
    lora_slot, cache_root = engine.lora_choice(lora_request)
    bm, runner = engine.block_manager, engine.runner
    budget = engine.scheduler.max_num_batched_tokens
    params = SamplingParams()
    seqs = []
    for i, ids in enumerate(sequences):
        group = SequenceGroup(request_id=f"score-{i}", prompt=None, prompt_token_ids=list(ids), params=params,
                              request_seed=0, arrival=-1, weights=list(engine.model_set.weights),
                              lora_slot=lora_slot, cache_root=cache_root, weights_root=engine.weights_root)
        seqs.append(Sequence(group=group, index=0, token_ids=list(ids), seed=0))
    results: list[ScoreOutput] = []
    pos = 0
    while pos < len(seqs):
        batch: list[Sequence] = []
        tokens = 0
        try:
            while pos < len(seqs):
                seq = seqs[pos]
                fits = bm.can_allocate(seq, use_cache=False)
                if batch and (tokens + len(seq.token_ids) > budget or not fits):
                    break
                if not fits:
                    raise RastError(f"not enough free KV blocks to score a sequence of {len(seq.token_ids)} "
                                    f"tokens ({bm.num_free_blocks} free blocks of {bm.block_size})")
                bm.allocate(seq, use_cache=False)
                seq.num_scheduled_tokens = len(seq.token_ids)
                batch.append(seq)
                tokens += len(seq.token_ids)
                pos += 1
            inputs = runner.prepare(batch, is_prefill=True)
            logits = runner.forward_logits(inputs, None)
        finally:
            for seq in batch:
                bm.free(seq)
        offsets = inputs.meta.cu_seqlens_q.tolist()
        for b in range(len(batch)):
            rows = [t[offsets[b]:offsets[b + 1]] for t in logits]
            results.append(_finish(rows, engine.model_set.weights, engine.vocab_size, output))
    return results
