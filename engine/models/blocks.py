"""The parts of a decoder layer: RMSNorm, attention (q/k/v projections, the optional q/k norms, rotary,
the paged KV cache and the attention backend) and the gated MLP. Forward has no host syncs and takes
every shape from tensors, so a decode step can be captured in a CUDA graph."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from rast_engine.attention.base import AttentionBackend
from rast_engine.attention.metadata import AttentionMetadata
from rast_engine.models.config import ModelConfig
from rast_engine.models.layer_ops import LayerOps, QKNorm
from rast_engine.models.rope import RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops: LayerOps, weight: Optional[torch.Tensor] = None) -> None:
        """``weight``: [size], or [G, size] for rows in G groups (stacked models); default ones."""
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = nn.Parameter(torch.ones(size)) if weight is None else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): HF's residual add, then this norm."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend,
                 qkv_proj: Optional[nn.Module] = None, o_proj: Optional[nn.Module] = None,
                 qk_norms: Optional[tuple[RMSNorm, RMSNorm]] = None, window: Optional[int] = None
                 ) -> None:
        """``window``: this layer's sliding window (None: full attention). The projections default to
        nn.Linear, and with cfg.qk_norm the q and k norms to RMSNorm over head_dim (cfg.qk_norm_full: over
        all heads' q, and all heads' k); models.stacked passes batched ones."""
        super().__init__()
        self.head_dim, self.q_size, self.kv_size = cfg.head_dim, cfg.q_size, cfg.kv_size
        self.qkv_proj = qkv_proj if qkv_proj is not None else nn.Linear(
            cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = o_proj if o_proj is not None else nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        if (cfg.qk_norm or cfg.qk_norm_full) and qk_norms is None:
            q_width, k_width = (cfg.q_size, cfg.kv_size) if cfg.qk_norm_full else (cfg.head_dim, cfg.head_dim)
            qk_norms = (RMSNorm(q_width, cfg.rms_norm_eps, rotary.ops), RMSNorm(k_width, cfg.rms_norm_eps, rotary.ops))
        self.q_norm, self.k_norm = qk_norms if qk_norms is not None else (None, None)
        self.norm_heads = cfg.qk_norm  # per head, inside the rotary kernel; else over the whole projection
        self.rotary, self.backend, self.window = rotary, backend, window
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim ** -0.5
        self.softcap = cfg.attn_softcap

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        qk_norm = None
        if self.q_norm is not None and self.norm_heads:
            qk_norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        elif self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = rotate_store_attend(q, k, v, positions, meta, kv_cache, self.rotary, self.backend, self.head_dim,
                                  self.scale, qk_norm, self.window, self.softcap)
        return self.o_proj(out.reshape(-1, self.q_size))


def rotate_store_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        meta: AttentionMetadata, kv_cache: KVCache, rotary: RotaryEmbedding,
                        backend: AttentionBackend, head_dim: int, scale: float, qk_norm: Optional[QKNorm] = None,
                        window: Optional[int] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """[T, heads * head_dim] projections -> attention output [T, heads, head_dim]: the q/k norms of each
    head when given (Qwen3), rotary on q and k, this step's k/v into the paged cache, attention over the
    cached keys (the last ``window`` of them, with a sliding window)."""
    q, k, v = (x.unflatten(-1, (-1, head_dim)) for x in (q, k, v))
    if rotary.ops.stores_kv:
        meta.check_cache(kv_cache[0])
        q, k = rotary.forward_store_kv(positions, q, k, v, kv_cache[0], kv_cache[1], meta.slot_mapping, qk_norm)
        return backend.attend(q, k, v, kv_cache[0], kv_cache[1], meta, scale, window, softcap)
    q, k = rotary(positions, q, k, qk_norm)
    return backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, scale, window, softcap)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: LayerOps, gate_up_proj: Optional[nn.Module] = None,
                 down_proj: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.gate_up_proj = gate_up_proj if gate_up_proj is not None else nn.Linear(
            cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = down_proj if down_proj is not None else nn.Linear(
            cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.ops = ops
        self.gelu = cfg.activation == "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        return self.down_proj(self.ops.gelu_tanh_and_mul(gate_up) if self.gelu else self.ops.silu_and_mul(gate_up))
