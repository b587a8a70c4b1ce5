"""TorchAttention: the reference paged attention, plain PyTorch on any device. Correct first, simple:
one sequence at a time, scores in float32. Every other backend is tested against this one."""
from __future__ import annotations

import torch

from rast_engine.attention.metadata import AttentionMetadata


class TorchAttention:
    name = "torch"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k, v, k_cache, v_cache, meta, scale)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
        group = num_heads // num_kv_heads
        out = torch.empty_like(q)
        cu = meta.cu_seqlens_q.tolist()
        for b, ctx in enumerate(meta.context_lens.tolist()):
            start, end = cu[b], cu[b + 1]
            q_len = end - start
            if q_len == 0:
                continue
            keys, values = gather_kv(k_cache, v_cache, meta.block_tables[b], ctx, meta.block_size)
            # query i sits at position ctx - q_len + i and sees keys 0..that position
            qf = q[start:end].float().transpose(0, 1)  # [H, q_len, D]
            kf = keys.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, ctx, D]
            vf = values.float().repeat_interleave(group, dim=1).transpose(0, 1)
            scores = (qf @ kf.transpose(1, 2)) * scale  # [H, q_len, ctx]
            q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
            k_pos = torch.arange(ctx, device=q.device)[None, :]
            scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
            out[start:end] = (scores.softmax(dim=-1) @ vf).transpose(0, 1).to(q.dtype)
        return out


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write this step's k/v rows at their flat slots; slot -1 (padding) is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep].to(v_cache.dtype))


def gather_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_row: torch.Tensor, ctx: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's first ctx keys and values, [ctx, Hkv, D] each, read through its block table row."""
    blocks = block_row[: (ctx + block_size - 1) // block_size].long()
    keys = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:ctx]
    values = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:ctx]
    return keys, values
