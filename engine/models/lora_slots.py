"""A small base model with room for several LoRA adapters, one chosen per token (engine/lora_modules.py).

``slot_view`` makes R a view of S (every tensor S's own) whose every decoder projection is a SlotLoraLinear
with ``max_loras`` slots of fixed width: a projection fused from P parts (q/k/v: 3, gate/up: 2) gives each
slot P · max_rank columns of A and B, part p at [p · max_rank, p · max_rank + r). Slot s holds adapter
s's A rows and its B (scale folded in) there, zeros elsewhere, so a token of slot s gets exactly its
adapter's delta and a token of none (-1) gets S's output. The layout never changes after it is built:
loading an adapter writes its slot's columns in place, so captured CUDA graphs stay valid, and clearing
a slot zeroes them.

Two ways to add the deltas, by the model's layer ops: "triton" (CUDA) runs rast_kernels.lora_slots, which
reads only the slots the step's tokens use and only B's diagonal blocks (W·in + out·max_rank a used slot);
"torch" multiplies by every slot and keeps each token's own columns (a ``where``), reading
max_loras · W · (in + out) a projection whatever the batch uses.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from rast_engine.errors import ModelLoadError
from rast_engine.models.decoder import CausalLM
from rast_engine.models.lora import LoraAdapter, LoraLinear, shared_copy
from rast_kernels.lora_slots import lora_slots_add_


@dataclass
class SlotDelta:
    """One adapted part of an adapter, ready to be written into a slot."""
    linear: SlotLoraLinear
    column: int  # its first column within a slot
    start: int  # its first output row
    a: torch.Tensor  # [r, in], in the slot's dtype
    b: torch.Tensor  # [rows, r], the scale folded in, in the slot's dtype


class AdapterRows:
    """The adapter slot of each token of the step a multi-adapter view runs (AttentionMetadata.lora_slots,
    -1: none; None: no token has one), set by the model's forward for its SlotLoraLinear layers to read, and
    each token's column mask, made once a step per slot layout (projections of one width share it)."""

    def __init__(self) -> None:
        self.ids: Optional[torch.Tensor] = None
        self._masks: dict[int, torch.Tensor] = {}

    def set(self, ids: Optional[torch.Tensor]) -> None:
        self.ids, self._masks = ids, {}

    def mask(self, column_slot: torch.Tensor) -> Optional[torch.Tensor]:
        """[T, columns] bool: whether each column is the token's own slot's (None: no token has one)."""
        if self.ids is None:
            return None
        key = column_slot.shape[0]
        if key not in self._masks:
            self._masks[key] = self.ids[:, None] == column_slot
        return self._masks[key]


class SlotLoraLinear(LoraLinear):
    """A projection of S with ``max_loras`` adapter slots (module docstring); a token's delta is its own
    slot's (``rows.ids``), zero for a token of none. That holds for finite A and B only on the torch path
    (0 · inf is NaN), which the loaders check."""

    def __init__(self, base: nn.Linear, max_loras: int, max_rank: int, part_starts: list[int], rows: AdapterRows,
                 gathered: bool) -> None:
        width = len(part_starts) * max_rank
        columns = max_loras * width
        super().__init__(base, torch.zeros(columns, base.in_features), torch.zeros(base.out_features, columns))
        self.rows, self.max_loras, self.slot_width, self.part_starts = rows, max_loras, width, part_starts
        self.gathered = gathered
        if not gathered:
            self.register_buffer("column_slot", (torch.arange(columns) // width).to(base.weight.device, torch.int32))

    def add_to_(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ids = self.rows.ids
        if ids is None:
            return y
        if ids.shape[0] != x.shape[0]:
            raise RuntimeError(f"{ids.shape[0]} adapter slots for {x.shape[0]} tokens")
        if self.gathered:
            return lora_slots_add_(y, x, self.lora_a, self.lora_b, ids, self.max_loras, self.part_starts)
        # a where, not a product with the mask: another slot's x·Aᵀ may overflow (fp16), and 0 · inf is NaN
        return y.addmm_(torch.where(self.rows.mask(self.column_slot), x @ self.lora_a.t(), 0), self.lora_b.t())


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
    parts, gathered = parts_of(view), view.ops.name == "triton"
    for parent in list(view.layers.modules()):
        for name, linear in list(parent.named_children()):
            if isinstance(linear, nn.Linear) and id(linear.weight) in parts:
                setattr(parent, name, SlotLoraLinear(linear, max_loras, max_rank, parts[id(linear.weight)], rows,
                                                     gathered))
    view.adapter_rows = rows
    return view


def slot_deltas(view: CausalLM, adapter: LoraAdapter, max_rank: int) -> list[SlotDelta]:
    """Where each of the adapter's parts goes in a slot of ``view``; ModelLoadError for an adapter that
    does not fit (a rank above max_rank, a module with no slot), before any slot is written."""
    owners = {id(m.weight): m for m in view.modules() if isinstance(m, SlotLoraLinear)}
    out = []
    for (param, start, _), a, b, scale in adapter._deltas(view):
        if id(param) not in owners:
            raise ModelLoadError(f"{str(adapter.path)!r} adapts more than the decoder's linear projections (an "
                                 "lm_head, embeddings), which adapters chosen per request cannot hold; give it as "
                                 "small_rl")
        if a.shape[0] > max_rank:
            raise ModelLoadError(f"{str(adapter.path)!r} has rank {a.shape[0]} over max_lora_rank {max_rank}")
        owner = owners[id(param)]
        dtype = owner.lora_b.dtype
        a, scaled = a.to(dtype), (b * scale).to(dtype)  # what the slot holds: a waiting load keeps only this
        if not (torch.isfinite(a).all() and torch.isfinite(scaled).all()):
            raise ModelLoadError(f"{str(adapter.path)!r}: its lora_A or scaled lora_B overflows {dtype}")
        out.append(SlotDelta(owner, owner.part_starts.index(start) * max_rank, start, a, scaled))
    return out


def page_locked(deltas: list[SlotDelta]) -> list[SlotDelta]:
    """``deltas`` with their A and B in page-locked host memory (itself if they are, or if the slots are not
    on CUDA), so write_slot's copies are queued without a host stall. Only the copies a registry keeps for
    reloads are locked, which max_loras and max_cpu_loras bound; those of waiting loads stay pageable."""
    if not deltas or not deltas[0].linear.lora_b.is_cuda or deltas[0].a.is_pinned():
        return deltas
    return [dataclasses.replace(d, a=d.a.pin_memory(), b=d.b.pin_memory()) for d in deltas]


@torch.no_grad()
def write_slot(view: CausalLM, slot: int, deltas: list[SlotDelta]) -> None:
    """Slot ``slot`` of every projection of ``view`` holds ``deltas`` (zeros where they adapt nothing).

    On CUDA every write is queued on the current stream without a host sync (from page-locked deltas,
    page_locked; pageable ones are staged by the driver first): it runs after every step already queued, whose side-stream work that stream joined
    (ModelStreams.overlap), and before every step queued after it. So a step in flight, even one still
    reading this slot for a sequence that has just finished, sees the old adapter, and the next step the
    new one. torch keeps a page-locked source alive until its copy has run."""
    clear_slot(view, slot)
    for d in deltas:
        col, r = slot * d.linear.slot_width + d.column, d.a.shape[0]
        d.linear.lora_a[col:col + r].copy_(d.a, non_blocking=True)
        d.linear.lora_b[d.start:d.start + d.b.shape[0], col:col + r].copy_(d.b, non_blocking=True)


@torch.no_grad()
def clear_slot(view: CausalLM, slot: int) -> None:
    for m in view.modules():
        if isinstance(m, SlotLoraLinear):
            width = m.slot_width
            m.lora_a[slot * width:(slot + 1) * width] = 0
            m.lora_b[:, slot * width:(slot + 1) * width] = 0
