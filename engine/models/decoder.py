"""CausalLM: one decoder-only causal LM for Llama, Qwen2 (+ q/k/v bias), Qwen3 (+ q/k norm per head),
Mistral, OLMo 2 and 3 (q/k norm over all heads, post-norm sublayers), Gemma 2 and 3 (sandwich norms) and
the mixtures of experts of models/moe.py, in plain PyTorch: embeddings, the layers of models/layers.py
(built from models/blocks.py), the final norm and the output head.

The batch is flat: T tokens of several sequences, described by AttentionMetadata; the attention backend
owns the paged KV cache. q/k/v and gate/up are fused into one matmul each; `weight_map()` tells the
loader where each HF tensor lands inside the fused weights. The elementwise work goes through a
LayerOps backend (plain torch, or fused Triton kernels). Forward has no host syncs and takes every shape
from tensors, so it can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from rast_engine.attention.base import AttentionBackend
from rast_engine.attention.metadata import AttentionMetadata
from rast_engine.models.blocks import KVCache, RMSNorm
from rast_engine.models.config import ModelConfig
from rast_engine.models.layer_ops import LayerOps, TorchLayerOps
from rast_engine.models.layers import NORMS, forward_layers, layer_class
from rast_engine.models.moe import SparseMoE
from rast_engine.models.rope import RotaryEmbedding

if TYPE_CHECKING:
    from rast_engine.models.lora_slots import AdapterRows

WeightSlot = tuple[torch.Tensor, int, int]  # (parameter, first row, rows) an HF tensor fills


def soft_capped_(logits: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """cap * tanh(logits / cap) in place, each op rounding in the logits' dtype as HF's three do."""
    return logits if cap is None else logits.div_(cap).tanh_().mul_(cap)


def rounded_scale(scale: float, dtype: torch.dtype) -> float:
    """``scale`` as a value of ``dtype``: a tensor times it then rounds once, as a product of two ``dtype``
    tensors does."""
    return float(torch.tensor(scale, dtype=torch.float32, device="cpu").to(dtype))  # also under a meta device


class CausalLM(nn.Module):
    copies = 1  # models' logits per forward (a StackedCausalLM computes one per model)
    adapter_rows: Optional[AdapterRows] = None  # a view of several LoRA adapters (models/lora.py): its tokens' slots

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
        layer = layer_class(cfg)
        self.layers = nn.ModuleList(
            layer.build(cfg, self.rotary if window is None else self.sliding_rotary, attention, self.ops, window, i)
            for i, window in enumerate(windows))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.ops)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.to(self.dtype)
        # Gemma's sqrt(hidden), rounded to the model dtype as HF's embedding multiplies by it
        self.embed_scale = None if cfg.embed_scale is None else rounded_scale(cfg.embed_scale, self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        meta: AttentionMetadata,
        kv_caches: list[KVCache],  # one (k_cache, v_cache) per layer
    ) -> torch.Tensor:  # [T, hidden], after the final norm
        if self.adapter_rows is not None:
            self.adapter_rows.set(meta.lora_slots)
        x = self.embed_tokens(input_ids)
        return forward_layers(self.layers, self.norm, x if self.embed_scale is None else x * self.embed_scale,
                              positions, meta, kv_caches)

    def compute_logits(self, hidden: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[N, hidden] -> [N, vocab_size] in the model dtype (the padded width; callers slice to V),
        written into ``out`` when given (the decode step's static logits, so no [N, V] is allocated);
        Gemma 2's soft cap applied as HF applies it."""
        logits = self.lm_head(hidden) if out is None else torch.mm(hidden, self.lm_head.weight.t(), out=out)
        return soft_capped_(logits, self.config.logit_softcap)

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
            for norm in NORMS[type(layer)]:
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
            if isinstance(mlp, SparseMoE):
                slots.update(mlp.weight_slots(pre))
                continue
            slots[pre + "mlp.gate_proj.weight"] = (mlp.gate_up_proj.weight, 0, inter)
            slots[pre + "mlp.up_proj.weight"] = (mlp.gate_up_proj.weight, inter, inter)
            slots[pre + "mlp.down_proj.weight"] = (mlp.down_proj.weight, 0, cfg.hidden_size)
        return slots
