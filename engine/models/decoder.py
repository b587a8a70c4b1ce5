"""One decoder-only causal LM for Llama, Qwen2 (+ q/k/v bias), Qwen3 (+ q/k norm per head) and OLMo 2
(q/k norm over all heads, post-norm sublayers), in plain PyTorch.

The batch is flat: T tokens of several sequences, described by AttentionMetadata; the attention backend
owns the paged KV cache. q/k/v and gate/up are fused into one matmul each; `weight_map()` tells the
loader where each HF tensor lands inside the fused weights. The elementwise work goes through a
LayerOps backend (plain torch, or fused Triton kernels); the residual stream is carried between layers
so each residual add is fused into the norm after it. Forward has no host syncs and takes every shape
from tensors, so it can be captured in a CUDA graph later.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from rast_engine.attention.base import AttentionBackend
from rast_engine.attention.metadata import AttentionMetadata
from rast_engine.models.config import ModelConfig
from rast_engine.models.layer_ops import LayerOps, QKNorm, TorchLayerOps
from rast_engine.models.rope import RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]
WeightSlot = tuple[torch.Tensor, int, int]  # (parameter, first row, rows) an HF tensor fills


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
        """``window``: this layer's sliding window (None: full attention). The projections default to nn.Linear, and with cfg.qk_norm the q and k norms to RMSNorm over
        head_dim (cfg.qk_norm_full: over all heads' q, and all heads' k); models.stacked passes batched ones."""
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
                                  qk_norm, self.window)
        return self.o_proj(out.reshape(-1, self.q_size))


def rotate_store_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        meta: AttentionMetadata, kv_cache: KVCache, rotary: RotaryEmbedding,
                        backend: AttentionBackend, head_dim: int, qk_norm: Optional[QKNorm] = None,
                        window: Optional[int] = None) -> torch.Tensor:
    """[T, heads * head_dim] projections -> attention output [T, heads, head_dim]: the q/k norms of each
    head when given (Qwen3), rotary on q and k, this step's k/v into the paged cache, attention over the
    cached keys (the last ``window`` of them, with a sliding window)."""
    q, k, v = (x.unflatten(-1, (-1, head_dim)) for x in (q, k, v))
    scale = head_dim ** -0.5
    if rotary.ops.stores_kv:
        meta.check_cache(kv_cache[0])
        q, k = rotary.forward_store_kv(positions, q, k, v, kv_cache[0], kv_cache[1], meta.slot_mapping, qk_norm)
        return backend.attend(q, k, v, kv_cache[0], kv_cache[1], meta, scale, window)
    q, k = rotary(positions, q, k, qk_norm)
    return backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, scale, window)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: LayerOps, gate_up_proj: Optional[nn.Module] = None,
                 down_proj: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.gate_up_proj = gate_up_proj if gate_up_proj is not None else nn.Linear(
            cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = down_proj if down_proj is not None else nn.Linear(
            cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, input_layernorm: RMSNorm, self_attn: Attention, post_attention_layernorm: RMSNorm,
                 mlp: MLP) -> None:
        super().__init__()
        self.input_layernorm, self.self_attn = input_layernorm, self_attn
        self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp

    @classmethod
    def build(cls, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend,
              ops: LayerOps, window: Optional[int] = None) -> DecoderLayer:
        return cls(RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops),
                   Attention(cfg, rotary, backend, window=window),
                   RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops), MLP(cfg, ops))

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor], positions: torch.Tensor,
        meta: AttentionMetadata, kv_cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings for the first layer, residual None);
        returns this layer's MLP output and the residual stream it has not been added to yet."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, positions, meta, kv_cache)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class PostNormDecoderLayer(nn.Module):
    """OLMo 2's layer: h + norm(attn(h)), then h + norm(mlp(h)), with no norm on a sublayer's input. It
    carries the residual stream as DecoderLayer does, so forward_layers runs either."""

    def __init__(self, self_attn: Attention, post_attention_layernorm: RMSNorm, mlp: MLP,
                 post_feedforward_layernorm: RMSNorm) -> None:
        super().__init__()
        self.self_attn, self.post_attention_layernorm = self_attn, post_attention_layernorm
        self.mlp, self.post_feedforward_layernorm = mlp, post_feedforward_layernorm

    @classmethod
    def build(cls, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend,
              ops: LayerOps, window: Optional[int] = None) -> PostNormDecoderLayer:
        return cls(Attention(cfg, rotary, backend, window=window), RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops),
                   MLP(cfg, ops), RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops))

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor], positions: torch.Tensor,
        meta: AttentionMetadata, kv_cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As DecoderLayer.forward: returns norm(mlp(h)) and the stream h it joins in the next layer."""
        h = x if residual is None else residual + x
        h = h + self.post_attention_layernorm(self.self_attn(h, positions, meta, kv_cache))
        return self.post_feedforward_layernorm(self.mlp(h)), h


def forward_layers(layers: nn.ModuleList, norm: RMSNorm, x: torch.Tensor, positions: torch.Tensor,
                   meta: AttentionMetadata, kv_caches: list[KVCache]) -> torch.Tensor:
    """Embeddings [T, hidden] through every layer and the final norm, each residual add fused into the
    norm after it (ModelConfig has num_layers >= 1, so the residual is set when the final norm runs)."""
    residual = None
    for layer, kv_cache in zip(layers, kv_caches, strict=True):
        x, residual = layer(x, residual, positions, meta, kv_cache)
    return norm.add_forward(x, residual)[0]


class CausalLM(nn.Module):
    copies = 1  # models' logits per forward (a StackedCausalLM computes one per model)

    def __init__(
        self, cfg: ModelConfig, attention: AttentionBackend, dtype: torch.dtype | None = None,
        ops: LayerOps | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.dtype = dtype or cfg.torch_dtype
        self.ops = ops or TorchLayerOps()
        self.rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_context, cfg.rope_theta, cfg.rope_scaling, self.dtype, self.ops
        )
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # sliding-window layers may rotate with parameters of their own (OLMo 3)
        self.sliding_rotary = self.rotary if cfg.sliding_rope is None else RotaryEmbedding(
            cfg.head_dim, cfg.max_context, *cfg.sliding_rope, self.dtype, self.ops)
        windows = cfg.layer_windows or (None,) * cfg.num_layers
        layer = PostNormDecoderLayer if cfg.post_norm else DecoderLayer
        self.layers = nn.ModuleList(
            layer.build(cfg, self.rotary if window is None else self.sliding_rotary, attention, self.ops, window)
            for window in windows)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.ops)
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
        return forward_layers(self.layers, self.norm, self.embed_tokens(input_ids), positions, meta, kv_caches)

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
            norms = ("post_attention_layernorm", "post_feedforward_layernorm") if cfg.post_norm else \
                ("input_layernorm", "post_attention_layernorm")
            for norm in norms:
                slots[pre + f"{norm}.weight"] = (getattr(layer, norm).weight, 0, cfg.hidden_size)
            if attn.q_norm is not None:
                slots[pre + "self_attn.q_norm.weight"] = (attn.q_norm.weight, 0, attn.q_norm.weight.shape[-1])
                slots[pre + "self_attn.k_norm.weight"] = (attn.k_norm.weight, 0, attn.k_norm.weight.shape[-1])
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
