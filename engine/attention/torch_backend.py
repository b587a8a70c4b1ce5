"""TorchAttention: the reference paged attention, plain PyTorch on any device. Correct first, simple:
scores in float32; a prefill one sequence at a time, a decode step (one query per sequence) as one batch
whose keys are read through the block tables up to the longest context, the rest masked. Every other
backend is tested against this one."""
from __future__ import annotations

import torch

from rast_engine.attention.metadata import AttentionMetadata
from rast_kernels.fp8_kv import read_blocks, write_slots


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
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        meta.check_cache(k_cache)
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, k, v, k_cache, v_cache, meta, scale, window, softcap)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, window: int | None = None,
               softcap: float | None = None) -> torch.Tensor:
        if not meta.is_prefill:
            return _decode(q, k_cache, v_cache, meta, scale, window, softcap)
        num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
        group = num_heads // num_kv_heads
        out = torch.empty_like(q)
        cu = meta.cu_seqlens_q.tolist()
        for b, ctx in enumerate(meta.context_lens.tolist()):
            start, end = cu[b], cu[b + 1]
            q_len = end - start
            if q_len == 0:
                continue
            keys, values = gather_kv(k_cache, v_cache, meta.block_tables[b], ctx, meta.block_size, q.dtype)
            # query i sits at position ctx - q_len + i and sees keys 0..that position (with a window: the
            # last ``window`` of them)
            qf = q[start:end].float().transpose(0, 1)  # [H, q_len, D]
            kf = keys.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, ctx, D]
            vf = values.float().repeat_interleave(group, dim=1).transpose(0, 1)
            scores = capped((qf @ kf.transpose(1, 2)) * scale, softcap)  # [H, q_len, ctx]
            q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
            k_pos = torch.arange(ctx, device=q.device)[None, :]
            hidden = k_pos > q_pos
            if window is not None:
                hidden |= k_pos <= q_pos - window
            scores = scores.masked_fill(hidden, float("-inf"))
            out[start:end] = (scores.softmax(dim=-1) @ vf).transpose(0, 1).to(q.dtype)
        return out


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
            scale: float, window: int | None, softcap: float | None) -> torch.Tensor:
    """q [B, H, D], one query per sequence at its last position: every sequence in one batch. A sequence
    of context 0 (a padding row) attends to nothing and gets zeros."""
    b, num_heads, dim = q.shape
    num_kv_heads, bs = k_cache.shape[2], meta.block_size
    lens = meta.context_lens.long()
    width = -(-int(lens.max()) // bs) if b else 0  # blocks of the longest context (a host read, as above)
    blocks = meta.block_tables[:, :width].long().flatten()
    keys = read_blocks(k_cache, blocks, q.dtype).reshape(b, width * bs, num_kv_heads, dim).float()
    values = read_blocks(v_cache, blocks, q.dtype).reshape(b, width * bs, num_kv_heads, dim).float()
    qf = q.float().view(b, num_kv_heads, num_heads // num_kv_heads, dim)  # GQA: query heads grouped per kv head
    scores = capped(torch.einsum("bkgd,bnkd->bkgn", qf, keys) * scale, softcap)
    key_pos = torch.arange(width * bs, device=q.device)[None, :]
    past = key_pos >= lens[:, None]  # [B, keys]: beyond the context
    if window is not None:
        past |= key_pos < lens[:, None] - window  # before the window: hidden alike
    # a reused block may hold anything past a context (NaN, inf): probability 0 must meet a finite value
    values = values.masked_fill(past[:, :, None, None], 0.0)
    probs = scores.masked_fill(past[:, None, None, :], float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return torch.einsum("bkgn,bnkd->bkgd", probs, values).reshape(b, num_heads, dim).to(q.dtype)


def capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """softcap * tanh(scores / softcap) (Gemma 2's attention), or the scores as they are."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write this step's k/v rows at their flat slots; slot -1 (padding) is skipped. An FP8 cache takes
    each (token, head) row with its own power-of-two scale (rast_kernels.fp8_kv, as the kernels store)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    write_slots(k_cache, slots, k[keep])
    write_slots(v_cache, slots, v[keep])


def gather_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_row: torch.Tensor, ctx: int, block_size: int,
    into: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's first ctx keys and values, [ctx, Hkv, D] each, read through its block table row
    (``into``: the query's dtype, see read_blocks)."""
    blocks = block_row[: (ctx + block_size - 1) // block_size].long()
    keys = read_blocks(k_cache, blocks, into).reshape(-1, *k_cache.shape[2:])[:ctx]
    values = read_blocks(v_cache, blocks, into).reshape(-1, *v_cache.shape[2:])[:ctx]
    return keys, values
