"""Planning the step after one still on the device (Scheduler's mixin, for LLMEngine's async_scheduling).

``schedule_ahead`` plans the step after one still running on the device, whose tokens are pending
(see sequence.py): a decode step, or a prefill step admitting waiting requests with the pending
sequences riding along, whenever it needs nothing the host has yet to learn (no preemption, no chunk
of a partial prefill, no fork). Stop checks see known tokens only; a sequence that stops on a pending
token has one more token computed and discarded.
"""
from __future__ import annotations

from collections import deque
from typing import Optional

from rast_engine.block_manager import BlockManager
from rast_engine.scheduler_output import SchedulerOutput
from rast_engine.sequence import Sequence
from rast_engine.stop_rules import StopRules


class ScheduleAhead:
    """Mixed into Scheduler, whose prefill scheduling and admission checks it uses."""
    waiting: deque[Sequence]
    running: list[Sequence]
    bm: BlockManager
    stops: StopRules
    max_num_seqs: int

    def schedule_ahead(self) -> Optional[SchedulerOutput]:
        """The step after one still on the device, over the running sequences' pending tokens (the
        device feeds them in), or None when it must wait for their ids: a running sequence has no
        pending token (a prompt prefilled in chunks, a first draw forking n > 1), a slot would need a
        preemption, or no sequence may go on. When the head of the queue can be admitted it is a
        prefill step that admits it, the pending sequences riding along; requests that wait for a slot
        or for blocks do not stop the decode steps (with more requests than max_num_seqs, as in an
        evaluation run, the queue is never empty). A sequence whose pending token reaches max_tokens or
        max_model_len stays out."""
        self._lora_pass()
        seqs = [s for s in self.running if not self.stops.at_length(s, pending=True)]
        if any(s.num_uncomputed != 1 or not s.num_pending for s in seqs):
            return None
        if self._admits_next(seqs):
            return self._schedule_prefill(seqs)
        if not seqs or not self.bm.can_append_all(seqs):
            return None
        copies = [c for c in map(self.bm.append_slot, seqs) if c is not None]
        for seq in seqs:
            seq.num_scheduled_tokens = 1
        return SchedulerOutput(seqs, False, copies)

    def _admits_next(self, decoding: list[Sequence]) -> bool:
        """Whether a prefill step scheduled now, ``decoding`` riding along, would admit the head of the
        queue, those waiting for a slot for their adapter aside (its first sequence is admitted whenever it
        fits). Nothing is loaded: the prefill step loads the adapter of a sequence it admits."""
        if len(self.running) >= self.max_num_seqs:
            return False
        i = self._with_lora_slot(0)
        return i >= 0 and self._fits(self.waiting[i], len(self.running), self.bm.append_need_all(decoding))
