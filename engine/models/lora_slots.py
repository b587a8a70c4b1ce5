"""A small base model with room for several LoRA adapters, one chosen per token (engine/lora_modules.py).

``slot_view`` makes R a view of S (every tensor S's own) whose every decoder projection is a LoraLinear
with ``max_loras`` slots of fixed width: a projection fused from P parts (q/k/v: 3, gate/up: 2) gives each
slot P · max_rank columns of A and B, part p at [p · max_rank, p · max_rank + r). Slot s holds adapter
s's A rows and its B (scale folded in) there, zeros elsewhere, so a token of slot s gets exactly its
adapter's delta and a token of none (-1) gets S's output. The layout never changes after it is built:
loading an adapter writes its slot's columns in place, so captured CUDA graphs stay valid, and clearing
a slot zeroes them. Every step reads every slot's A and B (max_loras · P · max_rank · (in + out) a
projection), loaded or not.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rast_engine.errors import ModelLoadError
from rast_engine.models.decoder import CausalLM
from rast_engine.models.lora import AdapterRows, LoraAdapter, LoraLinear, shared_copy


@dataclass
class SlotDelta:
    """One adapted part of an adapter, ready to be written into a slot."""
    linear: LoraLinear
    column: int  # its first column within a slot
    start: int  # its first output row
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [rows, r], the scale folded in


def parts_of(model: CausalLM) -> dict[int, list[int]]:
    """Per decoder projection weight (by id), the first output row of each part fused into it."""
    starts: dict[int, set[int]] = {}
    for name, (param, start, _) in model.weight_map().items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            starts.setdefault(id(param), set()).add(start)
    return {k: sorted(v) for k, v in starts.items()}


@torch.no_grad()
def slot_view(base: CausalLM, max_loras: int, max_rank: int) -> CausalLM:
    """R as ``base`` with ``max_loras`` empty adapter slots in every decoder projection; the view's
    ``adapter_rows`` is what its forward fills with each token's slot."""
    if base.config.num_experts:
        raise ModelLoadError("LoRA adapters chosen per request need a dense small base; a mixture of experts' "
                             "experts hold no slots")
    view, rows = shared_copy(base), AdapterRows()
    parts = parts_of(view)
    for parent in list(view.layers.modules()):
        for name, linear in list(parent.named_children()):
            if isinstance(linear, nn.Linear) and id(linear.weight) in parts:
                width = len(parts[id(linear.weight)]) * max_rank
                columns = max_loras * width
                lora = LoraLinear(linear, torch.zeros(columns, linear.in_features),
                                  torch.zeros(linear.out_features, columns), torch.arange(columns) // width, rows)
                lora.slot_width = width
                setattr(parent, name, lora)
    view.adapter_rows = rows
    return view


def slot_deltas(view: CausalLM, adapter: LoraAdapter, max_rank: int) -> list[SlotDelta]:
    """Where each of the adapter's parts goes in a slot of ``view``; ModelLoadError for an adapter that
    does not fit (a rank above max_rank, a module with no slot), before any slot is written."""
    parts = parts_of(view)
    owners = {id(m.weight): m for m in view.modules() if isinstance(m, LoraLinear)}
    out = []
    for (param, start, _), a, b, scale in adapter._deltas(view):
        if id(param) not in owners:
            raise ModelLoadError(f"{str(adapter.path)!r} adapts more than the decoder's linear projections (an "
                                 "lm_head, embeddings), which adapters chosen per request cannot hold; give it as "
                                 "small_rl")
        if a.shape[0] > max_rank:
            raise ModelLoadError(f"{str(adapter.path)!r} has rank {a.shape[0]} over max_lora_rank {max_rank}")
        dtype, scaled = owners[id(param)].lora_b.dtype, b * scale
        if not (torch.isfinite(a.to(dtype)).all() and torch.isfinite(scaled.to(dtype)).all()):
            raise ModelLoadError(f"{str(adapter.path)!r}: its lora_A or scaled lora_B overflows {dtype}")
        out.append(SlotDelta(owners[id(param)], parts[id(param)].index(start) * max_rank, start, a, scaled))
    return out


@torch.no_grad()
def write_slot(view: CausalLM, slot: int, deltas: list[SlotDelta]) -> None:
    """Slot ``slot`` of every projection of ``view`` holds ``deltas`` (zeros where they adapt nothing)."""
    clear_slot(view, slot)
    for d in deltas:
        col, r = slot * d.linear.slot_width + d.column, d.a.shape[0]
        d.linear.lora_a[col:col + r] = d.a.to(d.linear.lora_a.dtype)
        d.linear.lora_b[d.start:d.start + d.b.shape[0], col:col + r] = d.b.to(d.linear.lora_b.dtype)


@torch.no_grad()
def clear_slot(view: CausalLM, slot: int) -> None:
    for m in view.modules():
        if isinstance(m, LoraLinear):
            width = m.slot_width
            m.lora_a[slot * width:(slot + 1) * width] = 0
            m.lora_b[:, slot * width:(slot + 1) * width] = 0
