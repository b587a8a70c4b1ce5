"""Every model's forward for one step, with the large model and the small ones on two CUDA streams.

The large model runs on the caller's current stream ("main"); the small models run one after another on
a side stream, those of one architecture as one batched forward (models.stacked). The side
stream first waits for main (so it sees this step's inputs and cache copies), and main waits for the
side stream before returning, so whatever main enqueues next (the sampler) reads every model's logits.
Nothing here reads a device value on the host, so it also runs inside CUDA-graph capture, where the two
streams become two concurrent branches of the graph.

The large model is launched first: it is the critical path, and while the host launches the small
models' kernels the GPU is already busy with it.

Allocator invariant (eager mode): blocks of tensors allocated on the side stream (small activations and
logits) return to the side stream's pool when freed on the host, possibly before main's sampler has read
them. That is safe because every step starts with the side stream waiting for main, so no side-stream
kernel can reuse such a block before main's earlier work is done.

Logits come out of compute_logits in the model dtype (bf16 for a bf16 model), which is what the fused
sampler reads; nothing here converts or copies a [B, V] tensor. Decode steps write them into static
buffers (``outs``); the side stream overwrites its models' buffers only after waiting for main, so never
before main's sampler of the previous step has read them.
"""
from __future__ import annotations

import itertools
from typing import Callable, Optional, Sequence, TypeVar

import torch

from rast_engine.attention.metadata import AttentionMetadata
from rast_engine.kv_cache import KVPool
from rast_engine.models.stacked import ForwardUnit, StackedCausalLM

A = TypeVar("A")
B = TypeVar("B")


def unit_logits(unit: ForwardUnit, pool: KVPool, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, rows: Optional[torch.Tensor], outs: Sequence[Optional[torch.Tensor]]
                ) -> list[torch.Tensor]:
    """The unit's ``copies`` logits [N, width] at the flat token indices ``rows`` (None: every token),
    into ``outs`` where given."""
    hidden = unit(input_ids, positions, meta, pool)
    if isinstance(unit, StackedCausalLM):  # [copies, T, hidden]
        return unit.compute_logits(hidden if rows is None else hidden.index_select(1, rows), list(outs))
    return [unit.compute_logits(hidden if rows is None else hidden.index_select(0, rows), outs[0])]


class ModelStreams:
    def __init__(self, device: torch.device, enabled: bool) -> None:
        # on CPU, or with a single model, there is nothing to overlap: plain sequential forwards
        self.concurrent = enabled and device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.concurrent else None
        self.device = device

    def forward(self, units: Sequence[ForwardUnit], pools: Sequence[KVPool], input_ids: torch.Tensor,
                positions: torch.Tensor, meta: AttentionMetadata, rows: Optional[torch.Tensor],
                outs: Optional[Sequence[torch.Tensor]] = None) -> list[torch.Tensor]:
        """Logits of every unit's models in unit order (units[0] is the large model); written into
        ``outs`` (one tensor per model) when given."""
        outs = list(outs) if outs is not None else [None] * sum(u.copies for u in units)
        ends = list(itertools.accumulate(u.copies for u in units))
        slices = [outs[end - u.copies:end] for u, end in zip(units, ends)]
        if self.side is None or len(units) == 1:
            return [t for u, p, o in zip(units, pools, slices) for t in unit_logits(u, p, input_ids, positions,
                                                                                    meta, rows, o)]
        large, small = self.overlap(
            lambda: unit_logits(units[0], pools[0], input_ids, positions, meta, rows, slices[0]),
            lambda: [t for u, p, o in zip(units[1:], pools[1:], slices[1:])
                     for t in unit_logits(u, p, input_ids, positions, meta, rows, o)])
        return large + small

    def overlap(self, on_main: Callable[[], A], on_side: Callable[[], B]) -> tuple[A, B]:
        """on_main() on the current stream and on_side() on the side stream, concurrently (one after the
        other without a side stream). The side stream first waits for main, and main for it before
        returning, so both see what came before and whatever comes after sees both."""
        if self.side is None:
            return on_main(), on_side()
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)
        a = on_main()
        with torch.cuda.stream(self.side):
            b = on_side()
        main.wait_stream(self.side)
        return a, b
