"""The attention backend interface: store this step's K/V into the paged cache, then attend.

The cache layout is fixed, [num_blocks, block_size, num_kv_heads, head_dim] per layer, so the store
can also be done by the layer (rast_kernels.layer_ops.rotary_embedding_store_kv) and only ``attend``
called. Backends: "torch" (reference, any device), "triton" (GPU kernels in rast_kernels, also runs under
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
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Write k/v at meta.slot_mapping (skipping -1), then ``attend``."""
        ...

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        meta: AttentionMetadata, scale: float, window: int | None = None, softcap: float | None = None,
    ) -> torch.Tensor:
        """Causal attention of q over the cache, which already holds this step's k/v at meta.slot_mapping
        (a fused rotary + KV-store kernel wrote them); k/v are there for backends that read them directly.
        ``window``: a sliding window, as HF's: the token at position p sees keys p - window < j <= p.
        ``softcap``: Gemma 2's cap, each score s becoming softcap * tanh(s / softcap) before the softmax."""
        ...
