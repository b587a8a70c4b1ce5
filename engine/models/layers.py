"""How a decoder layer wires its norms around its attention and MLP, one class a layout:

- DecoderLayer (Llama, Qwen, Mistral): a norm before each sublayer;
- PostNormDecoderLayer (OLMo 2 and 3): a norm after each sublayer, none before;
- SandwichDecoderLayer (Gemma 2 and 3): a norm before and one after each sublayer.

Each carries the residual stream the same way, returning its MLP's (normed) output and the stream it has
not been added to yet, so forward_layers runs any of them and the next layer fuses that add into its first
norm where it has one.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from rast_engine.attention.base import AttentionBackend
from rast_engine.attention.metadata import AttentionMetadata
from rast_engine.models.blocks import MLP, Attention, KVCache, RMSNorm
from rast_engine.models.config import ModelConfig
from rast_engine.models.layer_ops import LayerOps
from rast_engine.models.moe import SparseMoE, feed_forward
from rast_engine.models.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, input_layernorm: RMSNorm, self_attn: Attention, post_attention_layernorm: RMSNorm,
                 mlp: MLP | SparseMoE) -> None:
        super().__init__()
        self.input_layernorm, self.self_attn = input_layernorm, self_attn
        self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp

    @classmethod
    def build(cls, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend,
              ops: LayerOps, window: Optional[int] = None, layer: int = 0) -> DecoderLayer:
        return cls(RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops),
                   Attention(cfg, rotary, backend, window=window),
                   RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops), feed_forward(cfg, ops, layer))

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

    def __init__(self, self_attn: Attention, post_attention_layernorm: RMSNorm, mlp: MLP | SparseMoE,
                 post_feedforward_layernorm: RMSNorm) -> None:
        super().__init__()
        self.self_attn, self.post_attention_layernorm = self_attn, post_attention_layernorm
        self.mlp, self.post_feedforward_layernorm = mlp, post_feedforward_layernorm

    @classmethod
    def build(cls, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend,
              ops: LayerOps, window: Optional[int] = None, layer: int = 0) -> PostNormDecoderLayer:
        return cls(Attention(cfg, rotary, backend, window=window), RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops),
                   feed_forward(cfg, ops, layer), RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops))

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


class SandwichDecoderLayer(nn.Module):
    """Gemma 2's and 3's layer: h + post_norm(attn(pre_norm(h))), then h + post_ff_norm(mlp(pre_ff_norm(h))).
    The residual adds fuse into the next pre-norm, as DecoderLayer's do."""

    def __init__(self, input_layernorm: RMSNorm, self_attn: Attention, post_attention_layernorm: RMSNorm,
                 pre_feedforward_layernorm: RMSNorm, mlp: MLP | SparseMoE, post_feedforward_layernorm: RMSNorm) -> None:
        super().__init__()
        self.input_layernorm, self.self_attn, self.post_attention_layernorm = (
            input_layernorm, self_attn, post_attention_layernorm)
        self.pre_feedforward_layernorm, self.mlp, self.post_feedforward_layernorm = (
            pre_feedforward_layernorm, mlp, post_feedforward_layernorm)

    @classmethod
    def build(cls, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend,
              ops: LayerOps, window: Optional[int] = None, layer: int = 0) -> SandwichDecoderLayer:
        def norm() -> RMSNorm:
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        return cls(norm(), Attention(cfg, rotary, backend, window=window), norm(), norm(),
                   feed_forward(cfg, ops, layer), norm())

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor], positions: torch.Tensor,
        meta: AttentionMetadata, kv_cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As DecoderLayer.forward: returns post_ff_norm(mlp(...)) and the stream it joins next."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        attended = self.post_attention_layernorm(self.self_attn(h, positions, meta, kv_cache))
        h, residual = self.pre_feedforward_layernorm.add_forward(attended, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


def layer_class(cfg: ModelConfig) -> type[DecoderLayer] | type[PostNormDecoderLayer] | type[SandwichDecoderLayer]:
    if cfg.sandwich_norm:
        return SandwichDecoderLayer
    return PostNormDecoderLayer if cfg.post_norm else DecoderLayer


NORMS = {DecoderLayer: ("input_layernorm", "post_attention_layernorm"),
         PostNormDecoderLayer: ("post_attention_layernorm", "post_feedforward_layernorm"),
         SandwichDecoderLayer: ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                "post_feedforward_layernorm")}  # each layout's norms, in HF's names
