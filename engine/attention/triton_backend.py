"""Triton attention backend: rast_kernels' paged kernels behind the AttentionBackend protocol.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (slow; tests only). Neither path
reads a device value on the host, so a decode step can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch

from rast_engine.attention.metadata import AttentionMetadata
from rast_kernels.kv_store import store_kv_cache
from rast_kernels.paged_attention import paged_decode_attention, paged_prefill_attention


class TritonAttention:
    name = "triton"

    def __init__(self, num_splits: int | None = None) -> None:
        # None lets the decode kernel pick split-K from the shapes (the same choice at every replay)
        if num_splits is not None and num_splits < 1:
            raise ValueError(f"num_splits must be >= 1 or None, got {num_splits}")
        self.num_splits = num_splits

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        meta.check_cache(k_cache)
        store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k, v, k_cache, v_cache, meta, scale, window, softcap)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, window: int | None = None,
               softcap: float | None = None) -> torch.Tensor:
        meta.check_cache(k_cache)
        if meta.is_prefill:
            return paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                           meta.cu_seqlens_q, meta.max_seqlen_q, scale, window=window, softcap=softcap)
        if q.shape[0] != meta.num_seqs:
            raise ValueError(f"a decode step has one token per sequence: got {q.shape[0]} tokens "
                             f"for {meta.num_seqs} sequences")
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                      num_splits=self.num_splits, window=window, softcap=softcap)
