"""A step's shared inputs, built from the scheduled sequences with tensor ops, not a loop per token: token
ids, positions, slot mapping and block tables, which every model of the step reads (ModelRunner.prepare).
The decode hot path writes its inputs into DecodeBuffers instead (decode_buffers.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence as Seq

import torch

from rast_engine.attention.metadata import AttentionMetadata
from rast_engine.sequence import Sequence


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    last_index: Optional[torch.Tensor] = None  # [B] int64: each sequence's last new token (prefill)


def prepare_inputs(seqs: Seq[Sequence], is_prefill: bool, bs: int, to_device: Callable[[torch.Tensor], torch.Tensor],
                   sampled_ids: Callable[[torch.Tensor], torch.Tensor], feed: Optional[Seq[int]] = None) -> StepInputs:
    """Prefill: each sequence's next ``num_scheduled_tokens`` uncomputed tokens (a chunk, or all of
    them); decode: its one uncomputed (last) token. ``last_index``: each sequence's last new token.
    ``feed[i]`` >= 0: sequence i's last input token is pending, and the device copies it from that
    row of the previous step's sampled ids (-1: all its tokens are known). ``bs``: the block size;
    ``sampled_ids(rows)``: the previous step's sampled ids at those device rows."""
    starts = [s.num_computed_tokens if is_prefill else len(s.token_ids) - 1 for s in seqs]
    ends = [a + s.num_scheduled_tokens if is_prefill else a + 1 for s, a in zip(seqs, starts)]
    bad = [s.seq_id for s, a, e in zip(seqs, starts, ends) if not a < e <= len(s.token_ids)]
    if bad:
        raise RuntimeError(f"sequences {bad} are scheduled outside their uncomputed tokens")
    ids: list[int] = []
    for s, a, e in zip(seqs, starts, ends):
        ids.extend(s.token_ids[a:e])
    q_lens = torch.tensor([e - a for a, e in zip(starts, ends)], dtype=torch.int64)
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    torch.cumsum(q_lens, 0, out=cu[1:])
    seq_of_token = torch.repeat_interleave(torch.arange(len(seqs)), q_lens)
    positions = torch.tensor(starts, dtype=torch.int64)[seq_of_token] + (
        torch.arange(int(cu[-1])) - cu[:-1][seq_of_token])
    width = max(len(s.block_table) for s in seqs)
    tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                          dtype=torch.int32)
    slots = tables[seq_of_token, positions // bs].to(torch.int64) * bs + positions % bs
    meta = AttentionMetadata(
        is_prefill=is_prefill,
        slot_mapping=to_device(slots),
        block_tables=to_device(tables),
        context_lens=to_device(torch.tensor(ends, dtype=torch.int32)),
        cu_seqlens_q=to_device(cu.to(torch.int32)),
        max_seqlen_q=int(q_lens.max()),
        max_seqlen_k=max(ends),
        block_size=bs,
        lora_slots=lora_slots(seqs, to_device, seq_of_token),
    )
    return StepInputs(
        input_ids=_fed(torch.tensor(ids, dtype=torch.int64), cu, feed, to_device, sampled_ids),
        positions=to_device(positions),
        meta=meta,
        last_index=to_device(cu[1:] - 1),
    )


def lora_slots(seqs: Seq[Sequence], to_device: Callable[[torch.Tensor], torch.Tensor],
               index: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Each sequence's LoRA adapter slot (-1: none), or each token's with ``index`` (its sequence), as an
    int32 tensor on the device; None when no sequence has an adapter."""
    slots = [s.group.lora_slot for s in seqs]
    if max(slots) < 0:
        return None
    out = torch.tensor(slots, dtype=torch.int32)
    return to_device(out if index is None else out[index])


def _fed(ids: torch.Tensor, cu: torch.Tensor, feed: Optional[Seq[int]],
         to_device: Callable[[torch.Tensor], torch.Tensor],
         sampled_ids: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The input ids on the device, the pending ones copied there from the sampled ids they await.
    A pending id left unfed would reach the embedding as -1: on CUDA a device-side assert."""
    fed = [] if feed is None else [(int(cu[i + 1]) - 1, r) for i, r in enumerate(feed) if r >= 0]
    if [at for at, _ in fed] != (ids < 0).nonzero().flatten().tolist():
        raise RuntimeError("the fed input tokens must be exactly the pending ones (the last of each sequence)")
    if not fed:
        return to_device(ids)
    at, rows = (to_device(torch.tensor(x, dtype=torch.int64)) for x in zip(*fed))
    return to_device(ids).index_copy_(0, at, sampled_ids(rows))
