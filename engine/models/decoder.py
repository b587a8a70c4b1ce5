"""One decoder-only causal LM for Qwen2 and Llama (Qwen2 = Llama + q/k/v bias), in plain PyTorch.

The batch is flat: T tokens of several sequences, described by AttentionMetadata; the attention backend
owns the paged KV cache. q/k/v and gate/up are fused into one matmul each; `weight_map()` tells the
loader where each HF tensor lands inside the fused weights. Forward has no host syncs and takes every
shape from tensors, so it can be captured in a CUDA graph later.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from rast_engine.attention.base import AttentionBackend
from rast_engine.attention.metadata import AttentionMetadata
from rast_engine.models.config import ModelConfig
from rast_engine.models.rope import RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]
WeightSlot = tuple[torch.Tensor, int, int]  # (parameter, first row, rows) an HF tensor fills


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in float32, scale applied after casting back, as the checkpoints were trained
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.rotary, self.backend = rotary, backend

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        out = self.backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, meta, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    def __init__(
        self, cfg: ModelConfig, attention: AttentionBackend, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.config = cfg
        self.dtype = dtype or cfg.torch_dtype
        self.rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, self.dtype
        )
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.rotary, attention) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.to(self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        meta: AttentionMetadata,
        kv_caches: list[KVCache],  # one (k_cache, v_cache) per layer
    ) -> torch.Tensor:  # [T, hidden], after the final norm
        x = self.embed_tokens(input_ids)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, positions, meta, kv_cache)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[N, hidden] -> [N, vocab_size] in the model dtype (the padded width; callers slice to V),
        written into ``out`` when given (the decode step's static logits, so no [N, V] is allocated)."""
        if out is None:
            return self.lm_head(hidden)
        return torch.mm(hidden, self.lm_head.weight.t(), out=out)

    def weight_map(self) -> dict[str, WeightSlot]:
        """HF tensor name -> where it goes. Tied lm_head is absent: it is the embedding."""
        cfg = self.config
        slots: dict[str, WeightSlot] = {
            "model.embed_tokens.weight": (self.embed_tokens.weight, 0, cfg.vocab_size),
            "model.norm.weight": (self.norm.weight, 0, cfg.hidden_size),
        }
        if not cfg.tie_word_embeddings:
            slots["lm_head.weight"] = (self.lm_head.weight, 0, cfg.vocab_size)
        q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        for i, layer in enumerate(self.layers):
            pre = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            slots[pre + "input_layernorm.weight"] = (layer.input_layernorm.weight, 0, cfg.hidden_size)
            slots[pre + "post_attention_layernorm.weight"] = (layer.post_attention_layernorm.weight, 0,
                                                              cfg.hidden_size)
            parts = {"q_proj": (0, q), "k_proj": (q, kv), "v_proj": (q + kv, kv)}
            for name, (start, rows) in parts.items():
                slots[pre + f"self_attn.{name}.weight"] = (attn.qkv_proj.weight, start, rows)
                if cfg.attention_bias:
                    slots[pre + f"self_attn.{name}.bias"] = (attn.qkv_proj.bias, start, rows)
            slots[pre + "self_attn.o_proj.weight"] = (attn.o_proj.weight, 0, cfg.hidden_size)
            if cfg.o_proj_bias:
                slots[pre + "self_attn.o_proj.bias"] = (attn.o_proj.bias, 0, cfg.hidden_size)
            slots[pre + "mlp.gate_proj.weight"] = (mlp.gate_up_proj.weight, 0, inter)
            slots[pre + "mlp.up_proj.weight"] = (mlp.gate_up_proj.weight, inter, inter)
            slots[pre + "mlp.down_proj.weight"] = (mlp.down_proj.weight, 0, cfg.hidden_size)
        return slots
