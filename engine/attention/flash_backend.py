"""FlashAttention backend: the flash_attn package's paged kernels, CUDA only.

K/V are stored with rast_kernels' store_kv_cache (slot -1 skipped; or by the layer's fused rotary), then:
- decode: flash_attn_with_kvcache(q[:, None], block_table, cache_seqlens), graph-capturable;
- prefill without a cached prefix: flash_attn_varlen_func on this step's k/v directly;
- prefill with a cached prefix (prefix hits, chunks): flash_attn_with_kvcache on a padded batch in
  which each sequence's new tokens are right-aligned, because its causal mask is aligned to the
  bottom-right corner: padded row j of a sequence sees keys up to j + ctx - max_q, which for the real
  token i (row max_q - q_len + i) is its position ctx - q_len + i.
Telling the two prefill cases apart reads context_lens on the host once per prefill step (prefill is
never captured in a CUDA graph). flash_attn's paged kernels constrain block_size (FA2 wants a
multiple of 256); it raises its own error when the cache does not fit.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from rast_engine.attention.metadata import AttentionMetadata
from rast_kernels.kv_store import store_kv_cache


def _import_flash_attn() -> ModuleType:
    try:
        import flash_attn
    except ImportError as e:
        raise ImportError("attention backend 'flash_attn' needs the flash-attn package "
                          "(pip install flash-attn; CUDA only); use 'triton' or 'torch' instead") from e
    return flash_attn


class FlashAttention:
    name = "flash_attn"

    def __init__(self, flash_attn_module: ModuleType | None = None) -> None:
        # a stand-in module with flash_attn's two functions lets tests check the glue on the CPU
        if flash_attn_module is None:
            if not torch.cuda.is_available():
                raise RuntimeError("attention backend 'flash_attn' needs a CUDA device")
            flash_attn_module = _import_flash_attn()
        self._fa = flash_attn_module

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        meta.check_cache(k_cache)
        store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k, v, k_cache, v_cache, meta, scale, window, softcap)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, window: int | None = None,
               softcap: float | None = None) -> torch.Tensor:
        # flash_attn's window counts the keys left of the query's own: HF's window less one; its softcap
        # (flash-attn >= 2.6) is Gemma 2's
        extra = {"window_size": (-1, -1) if window is None else (window - 1, 0)}
        if softcap is not None:
            extra["softcap"] = softcap
        if not meta.is_prefill:
            out = self._fa.flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.context_lens,
                                                   block_table=meta.block_tables, softmax_scale=scale, causal=True,
                                                   **extra)
            return out.squeeze(1)
        cu = meta.cu_seqlens_q
        q_lens = cu[1:] - cu[:-1]
        if torch.equal(q_lens, meta.context_lens):
            return self._fa.flash_attn_varlen_func(q, k, v, cu, cu, meta.max_seqlen_q, meta.max_seqlen_q,
                                                   softmax_scale=scale, causal=True, **extra)
        return self._prefill_with_prefix(q, k_cache, v_cache, meta, q_lens, scale, extra)

    def _prefill_with_prefix(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             meta: AttentionMetadata, q_lens: torch.Tensor, scale: float,
                             extra: dict[str, Any]) -> torch.Tensor:
        total, heads, dim = q.shape
        batch, max_q = meta.num_seqs, meta.max_seqlen_q
        seq = torch.repeat_interleave(torch.arange(batch, device=q.device), q_lens, output_size=total)
        local = torch.arange(total, device=q.device) - meta.cu_seqlens_q[seq]
        rows = seq * max_q + (max_q - q_lens[seq]) + local
        padded = q.new_zeros(batch * max_q, heads, dim)
        padded[rows] = q
        out = self._fa.flash_attn_with_kvcache(padded.view(batch, max_q, heads, dim), k_cache, v_cache,
                                               cache_seqlens=meta.context_lens, block_table=meta.block_tables,
                                               softmax_scale=scale, causal=True, **extra)
        return out.reshape(batch * max_q, heads, dim)[rows]
