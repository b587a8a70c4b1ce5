"""Small models of one architecture run as one forward over a repeated batch.

Every model of a RAST step reads the same tokens, so the small models' step is one computation on N sets
of weights: an (rl, base) pair (N = 2), or the distinct models of several pairs (experts sharing their
base: N = 3 for two pairs). Run separately, every kernel launches N times (a fused Llama-layout decoder
layer is 9 launches). Stacked:
- every projection is one batched GEMM over [N, T, ...] (torch.bmm on the stacked weights), and a
  mixture of experts' routers one more, its experts one fused call over all N·E; the layers
  are the model's own layer class (models/layers.py) with StackedLinear projections and [N, hidden] norm weights, so the
  stacked forward is the single model's forward, not a copy of it;
- every norm, rotary and activation kernel is one launch over N*T rows (norms take [N, hidden] weights);
- attention is one call over N*B sequences. Copy c's sequences are the given ones with their blocks at
  c * num_blocks + block in one pool of N x num_blocks blocks (KVCache with copies=N), so block ids,
  positions and lengths carry over (``stacked_metadata``).
So 1/N of the launches for the same bytes read: at batch 1, where each small kernel waits on its launch
rather than on memory, that is most of the small models' cost.

The stacked tensors are the models' own storage: stacking turns each CausalLM's parameters into views of
them, so nothing is duplicated, and every model still runs alone (tests compare against that). An RL model
given as a LoRA adapter shares its base's tensors (models/lora.py): stacked with that base, each
projection is one GEMM over both models' rows, reading the weight once, plus the adapter's rows' LoRA, and
the shared lm_head one GEMM too.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Union

import torch
from torch import nn

from rast_engine.attention.metadata import AttentionMetadata
from rast_engine.kv_cache import KVPool
from rast_engine.models.config import ModelConfig
from rast_engine.models.blocks import MLP, Attention, RMSNorm
from rast_engine.models.decoder import CausalLM, soft_capped_
from rast_engine.models.layers import NORMS, DecoderLayer, PostNormDecoderLayer, SandwichDecoderLayer, forward_layers
from rast_engine.models.lora import LoraLinear
from rast_engine.models.moe import SparseMoE

logger = logging.getLogger("rast")


def stacking_obstacle(a: CausalLM, b: CausalLM) -> Optional[str]:
    """Why the two cannot run as one batched forward (None: they can): any difference of shape,
    numerics (eps, rotary) or backends."""
    diff = a.config.differences(b.config)
    if diff:
        return "their configs differ in " + ", ".join(diff)
    if a.dtype != b.dtype or a.ops.name != b.ops.name:
        return "their dtypes or layer ops differ"
    if a.layers[0].self_attn.backend is not b.layers[0].self_attn.backend:
        return "their attention backends differ"
    if (is_lora_view(a) or is_lora_view(b)) and a.embed_tokens.weight is not b.embed_tokens.weight:
        return "a LoRA adapter's model stacks only with its base, whose weights it shares"
    return None


def is_lora_view(model: CausalLM) -> bool:
    """Whether ``model`` is an RL model given as a LoRA adapter over its base's own tensors (models/lora.py)."""
    return any(isinstance(m, LoraLinear) for m in model.modules())


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[N, ...] of the tensors, which become views of it (their old storage is freed: one transient). One
    tensor N times (a LoRA adapter's model and its base share it) is expanded, not copied."""
    if all(t is tensors[0] for t in tensors):
        return tensors[0].data.expand(len(tensors), *tensors[0].shape)
    stacked = torch.stack([t.data for t in tensors])
    for i, t in enumerate(tensors):
        t.data = stacked[i]
    return stacked


def stacked_metadata(meta: AttentionMetadata, num_blocks: int, copies: int) -> AttentionMetadata:
    """The step's metadata for copies x B sequences: the B given ones, then per further copy c the same
    sequences reading blocks offset by c * num_blocks. Device ops only (no host sync), so it runs inside
    a captured decode step."""
    slots, tables, cu = meta.slot_mapping, meta.block_tables, meta.cu_seqlens_q
    stored = slots >= 0  # padding slots (-1) stay padding in every copy
    tokens = cu[-1:]
    shifted = range(1, copies)
    return dataclasses.replace(
        meta,
        slot_mapping=torch.cat([slots] + [torch.where(stored, slots + c * num_blocks * meta.block_size, slots)
                                          for c in shifted]),
        block_tables=torch.cat([tables] + [tables + c * num_blocks for c in shifted]),
        context_lens=meta.context_lens.repeat(copies),
        cu_seqlens_q=torch.cat([cu] + [cu[1:] + (tokens if c == 1 else tokens * c) for c in shifted]),
    )


class StackedLinear(nn.Module):
    """N nn.Linear of one shape as one: [N*T, in] rows of N models -> [N*T, out], model m's rows through
    its weight, by one batched GEMM (bias included). Where the N share one weight (a LoRA adapter's model
    and its base), one GEMM over all rows reads it once, and each adapted model's rows get their LoRA."""

    def __init__(self, linears: list[nn.Linear | LoraLinear]) -> None:
        super().__init__()
        self.copies = len(linears)
        self.loras = [m if isinstance(m, LoraLinear) else None for m in linears]
        if all(m.weight is linears[0].weight for m in linears):
            self.shared: Optional[nn.Linear] = linears[0].base if isinstance(linears[0], LoraLinear) else linears[0]
            return
        if any(self.loras):
            raise ValueError("a LoRA projection stacks only with the base projection it shares")
        self.shared = None
        self.weight = _stack([lin.weight for lin in linears])  # [N, out, in]
        self.bias = None if linears[0].bias is None else _stack([lin.bias for lin in linears])[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            y = self.shared(x)
            rows = x.shape[0] // self.copies
            for c, lora in enumerate(self.loras):
                if lora is not None:
                    lora.add_to_(y[c * rows:(c + 1) * rows], x[c * rows:(c + 1) * rows])
            return y
        x, w = x.view(self.weight.shape[0], -1, x.shape[-1]), self.weight.transpose(1, 2)
        y = torch.bmm(x, w) if self.bias is None else torch.baddbmm(self.bias, x, w)
        return y.view(-1, y.shape[-1])


def _stacked_norm(norms: list[RMSNorm]) -> RMSNorm:
    """One norm over N models' rows, in N groups: the kernels take a [N, hidden] weight."""
    return RMSNorm(norms[0].weight.shape[-1], norms[0].eps, norms[0].ops, weight=_stack([n.weight for n in norms]))


def _stacked_mlp(mlps: list[MLP], cfg: ModelConfig) -> MLP:
    return MLP(cfg, mlps[0].ops, gate_up_proj=StackedLinear([m.gate_up_proj for m in mlps]),
               down_proj=StackedLinear([m.down_proj for m in mlps]))


def _stacked_moe(moes: list[SparseMoE], cfg: ModelConfig) -> SparseMoE:
    """One sparse block over N models' experts: the routers as one batched GEMM, the experts as one
    fused call over N·E experts (model m's at m·E ..)."""
    shared = None if moes[0].shared_expert is None else (
        _stacked_mlp([m.shared_expert for m in moes], cfg), StackedLinear([m.shared_expert_gate for m in moes]))
    return SparseMoE(cfg, moes[0].ops, gate=StackedLinear([m.gate for m in moes]),
                     experts=(_stack([m.experts_gate_up for m in moes]), _stack([m.experts_down for m in moes])),
                     shared=shared, copies=len(moes))


Layer = DecoderLayer | PostNormDecoderLayer | SandwichDecoderLayer


def _stacked_layer(layers: list[Layer], cfg: ModelConfig) -> Layer:
    """The models' layers as one layer of their class: its forward, unchanged, runs all N."""
    attn, mlp = [layer.self_attn for layer in layers], [layer.mlp for layer in layers]
    # q/k norms: rows of head_dim (each model's T * heads rows one consecutive group), or of all heads
    # (cfg.qk_norm_full: each model's T rows a group)
    qk_norms = None if attn[0].q_norm is None else (_stacked_norm([a.q_norm for a in attn]),
                                                     _stacked_norm([a.k_norm for a in attn]))
    attention = Attention(cfg, attn[0].rotary, attn[0].backend, qkv_proj=StackedLinear([a.qkv_proj for a in attn]),
                          o_proj=StackedLinear([a.o_proj for a in attn]), qk_norms=qk_norms, window=attn[0].window)
    feed_forward = _stacked_moe(mlp, cfg) if isinstance(mlp[0], SparseMoE) else _stacked_mlp(mlp, cfg)
    layout = type(layers[0])  # each layout's constructor names its norms as NORMS does (HF's names)
    norms = {name: _stacked_norm([getattr(layer, name) for layer in layers]) for name in NORMS[layout]}
    return layout(self_attn=attention, mlp=feed_forward, **norms)


class StackedCausalLM(nn.Module):
    """N >= 2 CausalLMs of one architecture (``stacking_obstacle`` None for each against the first) as
    one module: forward gives every model's final hidden states [N, T, hidden]; compute_logits gives
    their N logits."""

    def __init__(self, models: list[CausalLM]) -> None:
        super().__init__()
        if len(models) < 2 or len({id(m) for m in models}) != len(models):
            raise ValueError("stacking needs at least two distinct models")
        for m in models[1:]:
            reason = stacking_obstacle(models[0], m)
            if reason is not None:
                raise ValueError(f"cannot stack these models: {reason}")
        first = models[0]
        self.copies = len(models)  # models per KV pool: the pool holds copies x num_blocks blocks
        self.config, self.dtype, self.ops, self.embed_scale = first.config, first.dtype, first.ops, first.embed_scale
        self.embed = _stack([m.embed_tokens.weight for m in models])
        # tied lm_head: the same Parameter as the embedding, already a view of self.embed
        self.lm_head = self.embed if first.config.tie_word_embeddings else _stack([m.lm_head.weight for m in models])
        self.layers = nn.ModuleList(_stacked_layer(list(group), first.config)
                                    for group in zip(*(m.layers for m in models)))
        self.norm = _stacked_norm([m.norm for m in models])
        self.adapter_rows = [m.adapter_rows for m in models if m.adapter_rows is not None]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: KVPool) -> torch.Tensor:
        """Every model's final hidden states [N, T, hidden], on the pool of N x num_blocks blocks."""
        for rows in self.adapter_rows:  # each copy's T rows are the step's tokens in order
            rows.set(meta.lora_slots)
        meta = stacked_metadata(meta, kv_caches[0][0].shape[0] // self.copies, self.copies)
        positions = positions.repeat(self.copies)
        x = self.embed[:, input_ids].view(-1, self.config.hidden_size)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        hidden = forward_layers(self.layers, self.norm, x, positions, meta, kv_caches)
        return hidden.view(self.copies, -1, self.config.hidden_size)

    def compute_logits(self, hidden: torch.Tensor, outs: Optional[list[Optional[torch.Tensor]]] = None
                       ) -> list[torch.Tensor]:
        """[N, T, hidden] -> N logits [T, vocab_size] in the model dtype, each written into its ``outs``
        entry when given (one GEMM per model: the decode step's static logits are separate buffers)."""
        outs = outs or [None] * self.copies
        if self.lm_head.stride(0) == 0:  # one head shared (a LoRA adapter's model and its base): read it once
            logits = soft_capped_(torch.mm(hidden.flatten(0, 1), self.lm_head[0].t()), self.config.logit_softcap)
            return [part if o is None else o.copy_(part) for part, o in zip(logits.chunk(self.copies), outs)]
        return [soft_capped_(torch.mm(h, w.t()) if o is None else torch.mm(h, w.t(), out=o), self.config.logit_softcap)
                for h, w, o in zip(hidden, self.lm_head, outs)]


ForwardUnit = Union[CausalLM, StackedCausalLM]  # ``copies``: how many models' logits one forward gives


def forward_units(models: list[CausalLM], stack: bool) -> tuple[list[ForwardUnit], list[int]]:
    """What the runner calls, for models in role order (large, then rl and base per pair; a model that
    fills several roles, such as a base shared by two experts, is one object and runs once): the large
    model, then the distinct small models, those of one architecture stacked into one unit when
    ``stack`` is set. Also, per role, the index of its logits among the units' outputs in order."""
    small: list[CausalLM] = []
    for m in models[1:]:
        if m is not models[0] and all(m is not s for s in small):
            small.append(m)
    groups: list[list[CausalLM]] = []
    for m in small:
        group = next((g for g in groups if stack and all(stacking_obstacle(x, m) is None for x in g)), None)
        if group is None:
            groups.append([m])
        else:
            group.append(m)
    if stack:
        for g in groups[1:]:
            reason = next(r for x in groups[0] if (r := stacking_obstacle(x, g[0])) is not None)
            logger.info("small models run as %d forwards: %s", len(groups), reason)
    units: list[ForwardUnit] = [models[0]] + [g[0] if len(g) == 1 else StackedCausalLM(g) for g in groups]
    order = [models[0]] + [m for g in groups for m in g]
    return units, [next(i for i, m in enumerate(order) if m is role) for role in models]
