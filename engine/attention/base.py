"""The attention backend interface: store this step's K/V into the paged cache, then attend.

Backends: "torch" (reference, any device), "triton" (GPU kernels in rast_kernels, also runs under
TRITON_INTERPRET=1), "flash_attn" (when that package imports on CUDA). Every backend must equal the
torch backend up to floating-point tolerance; tests enforce it.
"""
from __future__ import annotations

from typing import Protocol

import torch

from rast_engine.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim], this step's keys (rotary already applied)
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Write k/v at meta.slot_mapping (skipping -1), then causal attention of q over the cache."""
        ...
