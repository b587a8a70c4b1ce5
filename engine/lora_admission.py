"""The scheduler's admission of requests that wait for their LoRA adapter's load (Scheduler's mixin).

A request whose LoRA adapter waits for a slot (engine/lora_registry.py: every slot held by admitted
requests) is admitted once ``load_lora`` can load its adapter, freeing a slot no admitted request holds;
until then it is passed over and the requests behind it are admitted FCFS as ever (vLLM's behaviour):
those of loaded adapters are not held up by it. The load is made only for a request admitted in the same
step, its sequence slot, token budget and blocks checked first: an idle adapter (and the prefix-cache
root of its blocks) is never evicted for a request that then waits for blocks. Its need is exact: the load
gives it a new prefix-cache root, where nothing is cached. A load that evicts an adapter sends that
adapter's queued, not yet admitted requests back to waiting for its reload, so they never keep a slot from
a load queued before them. Blocks are looked up and hashed only once a request has its slot, under its
adapter load's prefix-cache root.

The requests that wait add no host time a step that grows with their number: whether a slot can be freed
is asked once a scheduling pass (of the running sequences' slots, as a rule: LoraAdapters._lora_slots_held),
and the run of them at the head of the queue is walked once (``_lead``), not at every step, and again only
after a load.
"""
from __future__ import annotations

import itertools
from collections import deque
from typing import TYPE_CHECKING, Callable, Optional

from rast_engine.block_manager import BlockManager
from rast_engine.sequence import Sequence

if TYPE_CHECKING:
    from rast_engine.lora_registry import PendingLora


def _no_lora_loads(pending: Optional[PendingLora] = None) -> bool:  # Scheduler's LoRA calls without LoRA slots
    raise RuntimeError("a request waits for a LoRA adapter's load, and no registry loads adapters")


class LoraAdmission:
    """Mixed into Scheduler: which waiting sequence may be admitted as far as its adapter goes, and the load
    of its adapter once it is."""
    waiting: deque[Sequence]
    bm: BlockManager

    def __init__(self) -> None:
        # the engine's (LoraAdapters): whether a slot can be freed now for an adapter waiting requests need,
        # and its load into that slot (evicting an idle adapter), made only for a request admitted at once
        self.can_load_lora: Callable[[], bool] = _no_lora_loads
        self.load_lora: Callable[[PendingLora], bool] = _no_lora_loads
        # waiting[:_lead] all wait for their adapter's load: the scans for the first that does not start
        # there, so a run of them at the head is walked once, not at every step; kept by every insertion
        # and removal, and reset by any load (lora_loaded), whose requests may be anywhere in the queue
        self._lead = 0
        # set once no slot can be freed for a waiting load in this scheduling pass (schedule, schedule_ahead):
        # admissions and loads only take slots, so it holds until the pass ends and can_load_lora is not
        # asked again
        self._full = False

    def _lora_pass(self) -> None:
        """A scheduling pass begins: requests that ended since the last may have freed a slot."""
        self._full = False

    def _with_lora_slot(self, start: int) -> int:
        """The index, from ``start`` on, of the first waiting sequence whose LoRA adapter has a slot, or
        waits for one that can be freed now (-1: none); nothing is loaded here (_load_lora, on admission).
        While no slot can be freed, the sequences of every waiting adapter are passed over (a step frees no
        slot). ``waiting[:start]`` were passed over."""
        if start >= len(self.waiting):
            return -1
        if self.waiting[start].group.lora_pending is None:
            return start
        if not self._full and not self.can_load_lora():
            self._full = True
        return self._next_ready(start) if self._full else start

    def _next_ready(self, start: int) -> int:
        """The index, from ``start`` on, of the first waiting sequence that does not wait for its adapter's
        load (-1: none); ``waiting[:start]`` all do. With none waiting it is the first one looked at."""
        # the sequences from the head to _lead were walked over before (and to start by the caller)
        i = max(start, self._lead)
        for seq in itertools.islice(self.waiting, i, None):
            if seq.group.lora_pending is None:
                break
            i += 1
        self._lead = i
        return i if i < len(self.waiting) else -1

    def lora_loaded(self) -> None:
        """A waiting adapter was loaded (here, or by a score call): its requests stop waiting for it, in any
        place of the queue (LoraRegistry.loaded)."""
        self._lead = 0

    def _lead_after_insert(self, at: int, seq: Sequence) -> None:
        """``seq`` was queued at position ``at``."""
        if at <= self._lead:
            self._lead = self._lead + 1 if seq.group.lora_pending is not None else at

    def _lead_after_removal(self, seq: Sequence) -> None:
        """``seq`` left the queue from a place the caller does not know: one that does not wait for its
        adapter was behind waiting[:_lead], and of one that does (an aborted request's, before
        LoraRegistry.forget) _lead - 1 still lead. (An admitted one is at _lead or behind it, or its load
        reset _lead to 0: nothing to do.)"""
        if self._lead and seq.group.lora_pending is not None:
            self._lead -= 1

    def _load_lora(self, pending: PendingLora) -> None:
        """Load the adapter of a sequence being admitted, whose slot _with_lora_slot found (nothing freed or
        loaded a slot since)."""
        if not self.load_lora(pending):
            raise RuntimeError(f"LoRA adapter {pending.name!r} found no slot, though one could be freed")

    def _uncached(self, seq: Sequence) -> int:
        """The tokens a waiting sequence computes once admitted: all but its prefix-cache hits. One whose
        adapter waits for its load has no hit (the load gives it a new prefix-cache root), and is not
        looked up before it (block_manager._check_root)."""
        return len(seq.token_ids) if seq.group.lora_pending is not None else self.bm.uncached_tokens(seq)
