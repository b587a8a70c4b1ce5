"""An (rl, base) pair of one architecture, run as one forward over a doubled batch.

Both small models read the same tokens, so a step is the same computation on two sets of weights. Run
separately, that is every kernel launched twice (a fused decoder layer is 9 launches). Paired:
- every projection is one batched GEMM over [2, T, ...] (torch.bmm on the stacked weights);
- every norm, rotary and activation kernel is one launch over 2T rows (norms take [2, N] weights);
- attention is one call over 2B sequences. The base model's sequences are copies of the rl model's,
  with their blocks in the second half of one pool of 2 x num_blocks blocks (KVCache with copies=2),
  so block ids, positions and lengths carry over, offset by num_blocks (``paired_metadata``).
So half the small models' launches, for the same bytes read: at batch 1, where each small kernel waits
on its launch rather than on memory, that is most of the pair's cost.

The stacked tensors are the models' own storage: pairing turns each CausalLM's parameters into views
of them, so nothing is duplicated, and either model still runs alone (tests compare against that).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Union

import torch
from torch import nn

from rast_engine.attention.metadata import AttentionMetadata
from rast_engine.kv_cache import KVPool
from rast_engine.models.decoder import CausalLM, rotate_store_attend

logger = logging.getLogger("rast")


def pairing_obstacle(rl: CausalLM, base: CausalLM) -> Optional[str]:
    """Why the two cannot run as one batched forward (None: they can): any difference of shape,
    numerics (eps, rotary) or backends."""
    a, b = dataclasses.asdict(rl.config), dataclasses.asdict(base.config)
    diff = sorted(k for k in a if k != "torch_dtype" and a[k] != b[k])
    if diff:
        return "their configs differ in " + ", ".join(diff)
    if rl.dtype != base.dtype or rl.ops.name != base.ops.name:
        return "their dtypes or layer ops differ"
    if rl.layers[0].self_attn.backend is not base.layers[0].self_attn.backend:
        return "their attention backends differ"
    return None


def _stack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[2, ...] = (a, b), which become views of it (their old storage is freed: one tensor transient)."""
    both = torch.stack([a.data, b.data])
    a.data, b.data = both[0], both[1]
    return both


def paired_metadata(meta: AttentionMetadata, num_blocks: int) -> AttentionMetadata:
    """The step's metadata for 2B sequences: the B given ones, then B copies reading blocks offset by
    num_blocks. Device ops only (no host sync), so it runs inside a captured decode step."""
    slots = meta.slot_mapping
    t = meta.cu_seqlens_q[-1:]
    return dataclasses.replace(
        meta,
        slot_mapping=torch.cat([slots, torch.where(slots >= 0, slots + num_blocks * meta.block_size, slots)]),
        block_tables=torch.cat([meta.block_tables, meta.block_tables + num_blocks]),
        context_lens=meta.context_lens.repeat(2),
        cu_seqlens_q=torch.cat([meta.cu_seqlens_q, meta.cu_seqlens_q[1:] + t]),
    )


class PairedLayer(nn.Module):
    def __init__(self, rl: nn.Module, base: nn.Module) -> None:
        super().__init__()
        ra, ba = rl.self_attn, base.self_attn
        self.in_norm = _stack(rl.input_layernorm.weight, base.input_layernorm.weight)
        self.post_norm = _stack(rl.post_attention_layernorm.weight, base.post_attention_layernorm.weight)
        self.qkv = _stack(ra.qkv_proj.weight, ba.qkv_proj.weight)
        self.qkv_bias = None if ra.qkv_proj.bias is None else _stack(ra.qkv_proj.bias, ba.qkv_proj.bias)[:, None]
        self.o = _stack(ra.o_proj.weight, ba.o_proj.weight)
        self.o_bias = None if ra.o_proj.bias is None else _stack(ra.o_proj.bias, ba.o_proj.bias)[:, None]
        self.gate_up = _stack(rl.mlp.gate_up_proj.weight, base.mlp.gate_up_proj.weight)
        self.down = _stack(rl.mlp.down_proj.weight, base.mlp.down_proj.weight)
        self.eps, self.ops = rl.input_layernorm.eps, rl.mlp.ops
        self.q_size, self.kv_size, self.head_dim = ra.q_size, ra.kv_size, ra.head_dim
        self.rotary, self.backend = ra.rotary, ra.backend


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[2T, in] rows of two models -> [2T, out], model m's rows through weight[m] ([2, out, in])."""
    x = x.view(2, -1, x.shape[-1])
    y = torch.bmm(x, weight.transpose(1, 2)) if bias is None else torch.baddbmm(bias, x, weight.transpose(1, 2))
    return y.view(-1, y.shape[-1])


class PairedCausalLM(nn.Module):
    """Two CausalLMs of one architecture (``pairing_obstacle`` is None) as one module: forward gives the
    final hidden states of both, [2, T, hidden]; compute_logits gives [rl, base] logits."""

    copies = 2  # models per KV pool: the pool holds 2 x num_blocks blocks

    def __init__(self, rl: CausalLM, base: CausalLM) -> None:
        super().__init__()
        reason = pairing_obstacle(rl, base)
        if reason is not None:
            raise ValueError(f"cannot pair these models: {reason}")
        self.config, self.dtype, self.ops = rl.config, rl.dtype, rl.ops
        self.embed = _stack(rl.embed_tokens.weight, base.embed_tokens.weight)
        # tied lm_head: the same Parameter as the embedding, already a view of self.embed
        self.lm_head = self.embed if rl.config.tie_word_embeddings else _stack(rl.lm_head.weight, base.lm_head.weight)
        self.layers = nn.ModuleList(PairedLayer(a, b) for a, b in zip(rl.layers, base.layers, strict=True))
        self.norm = _stack(rl.norm.weight, base.norm.weight)
        self.eps = rl.norm.eps

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: KVPool) -> torch.Tensor:
        """Both models' final hidden states [2, T, hidden], on the pool of 2 x num_blocks blocks."""
        meta = paired_metadata(meta, kv_caches[0][0].shape[0] // 2)
        positions = positions.repeat(2)
        x = self.embed[:, input_ids].view(-1, self.config.hidden_size)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            if residual is None:
                h, residual = self.ops.rms_norm(x, layer.in_norm, layer.eps), x
            else:
                h, residual = self.ops.add_rms_norm(x, residual, layer.in_norm, layer.eps)
            q, k, v = _linear(h, layer.qkv, layer.qkv_bias).split([layer.q_size, layer.kv_size, layer.kv_size], -1)
            out = rotate_store_attend(q, k, v, positions, meta, kv_cache, layer.rotary, layer.backend,
                                      layer.head_dim)
            h, residual = self.ops.add_rms_norm(_linear(out.reshape(-1, layer.q_size), layer.o, layer.o_bias),
                                                residual, layer.post_norm, layer.eps)
            x = _linear(self.ops.silu_and_mul(_linear(h, layer.gate_up)), layer.down)
        return self.ops.add_rms_norm(x, residual, self.norm, self.eps)[0].view(2, -1, self.config.hidden_size)

    def compute_logits(self, hidden: torch.Tensor, outs: Optional[list[Optional[torch.Tensor]]] = None
                       ) -> list[torch.Tensor]:
        """[2, N, hidden] -> [rl, base] logits [N, vocab_size] in the model dtype, each written into its
        ``outs`` entry when given (two GEMMs: the decode step's static logits are separate buffers)."""
        outs = outs or [None, None]
        return [torch.mm(h, w.t()) if o is None else torch.mm(h, w.t(), out=o)
                for h, w, o in zip(hidden, self.lm_head, outs)]


ForwardUnit = Union[CausalLM, PairedCausalLM]  # ``copies``: how many of the step's logits it computes


def forward_units(models: list[CausalLM], pair: bool) -> list[ForwardUnit]:
    """What the runner calls, for models in runner order (large, then rl and base per pair): each pair
    as one PairedCausalLM when ``pair`` is set and its models allow it, else as its two models."""
    units: list[ForwardUnit] = [models[0]]
    for i, (rl, base) in enumerate(zip(models[1::2], models[2::2])):
        reason = pairing_obstacle(rl, base) if pair else None
        if pair and reason is None:
            units.append(PairedCausalLM(rl, base))
            continue
        if reason is not None:
            logger.info("pair %d runs as two forwards: %s", i, reason)
        units += [rl, base]
    return units
