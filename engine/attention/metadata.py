"""Per-step attention inputs, built once by the model runner and shared by every model of the triple.

Paged KV layout (every backend, every model): per layer a pair of tensors
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
(an FP8 cache has a few rows of per-token scales after each block's block_size rows: rast_kernels.fp8_kv).
Token ``j`` of a sequence lives in block ``block_table[j // block_size]`` at row ``j % block_size``;
its flat slot is ``block * block_size + row``. The block ids are the same for all models because they
decode the same tokens; only the pools differ (one per model, same ``num_blocks``).

Invariants the runner guarantees:
- the new tokens of a sequence are its last ``q_len`` positions: position p attends to keys [0, p];
- ``slot_mapping`` has one entry per new token; -1 means "do not store" (padding in CUDA graphs);
- ``context_lens[b]`` counts all keys of sequence b, cached prefix plus the new tokens;
- a step is either all-prefill (``is_prefill``; varlen q, possibly with a cached prefix; decoding
  sequences riding along in a prefill step are prefills of q_len 1) or
  all-decode (exactly one new token per sequence, ``cu_seqlens_q`` is then ``arange(B + 1)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from rast_kernels.fp8_kv import block_size_of


@dataclass
class AttentionMetadata:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32; rows padded with 0 past their used blocks
    context_lens: torch.Tensor  # [B] int32, keys per sequence including the new tokens
    cu_seqlens_q: torch.Tensor  # [B + 1] int32, offsets of each sequence's new tokens in the flat batch
    max_seqlen_q: int
    max_seqlen_k: int
    block_size: int
    # each new token's LoRA adapter slot, -1 for none (models/lora.py, engine/lora_modules.py); None: no
    # token has one. The attention backends never read it; copies of a stacked forward share it
    lora_slots: Optional[torch.Tensor] = None  # [T] int32

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    def check_cache(self, k_cache: torch.Tensor) -> None:
        """Slots index blocks of ``block_size`` rows: a cache of another block size would be written at
        the wrong rows, so whoever stores k/v checks this first."""
        if block_size_of(k_cache) != self.block_size:
            raise ValueError(f"cache block_size {block_size_of(k_cache)} != metadata block_size {self.block_size}")

    def __post_init__(self) -> None:
        if self.cu_seqlens_q.shape[0] != self.context_lens.shape[0] + 1:
            raise ValueError("cu_seqlens_q must have one more entry than context_lens")
        if self.block_tables.shape[0] != self.context_lens.shape[0]:
            raise ValueError("block_tables must have one row per sequence")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
