"""Continuous batching over one block table.

A step is all-prefill (waiting sequences admitted FCFS while the sequence limit, the token budget and the
free blocks allow) or, when nothing can be admitted, all-decode over every running sequence. When a
decode slot cannot be found, the most recently admitted sequence is preempted by recompute: its blocks
are freed and it goes back to the front of the queue with every token it has, so its output is unchanged
(the sampler's seed and offset depend only on the sequence, never on the batch).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional

from rast_engine.block_manager import BlockManager
from rast_engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence]
    is_prefill: bool
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) block pairs
    num_batched_tokens: int = 0


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: Iterable[int]) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Optional[SchedulerOutput]:
        out = self._schedule_prefill()
        if out.seqs:
            return out
        out = self._schedule_decode()
        return out if out.seqs else None

    def _schedule_prefill(self) -> SchedulerOutput:
        scheduled: list[Sequence] = []
        tokens = 0
        slots = len(self.running)
        while self.waiting:
            seq = self.waiting[0]
            if slots + seq.fanout > self.max_num_seqs:
                break
            # budget on the full length (an upper bound of the uncached part); the first always fits
            if scheduled and tokens + len(seq.token_ids) > self.max_num_batched_tokens:
                break
            if not self.bm.can_allocate(seq):
                break
            self.bm.allocate(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(seq)
            tokens += len(seq.token_ids) - seq.num_computed_tokens
            slots += seq.fanout
        return SchedulerOutput(scheduled, True, [], tokens)

    def _schedule_decode(self) -> SchedulerOutput:
        scheduled: list[Sequence] = []
        copies: list[tuple[int, int]] = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            while not self.bm.can_append(seq):
                victim = self.running.pop()  # always behind i, or seq itself
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                copy = self.bm.append_slot(seq)
                if copy is not None:
                    copies.append(copy)
                scheduled.append(seq)
                i += 1
                continue
            break
        return SchedulerOutput(scheduled, False, copies, len(scheduled))

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def requeue(self, seqs: list[Sequence]) -> None:
        """Undo a step that failed in the runner: its sequences give their blocks back and wait, in order,
        at the front of the queue, to be recomputed from their tokens (what the failed step may have
        written, or failed to copy, is never read)."""
        for seq in reversed(seqs):
            self.running.remove(seq)
            self.bm.free(seq)
            seq.reset_for_recompute()
            self.waiting.appendleft(seq)

    def check_stop(self, seq: Sequence, prev_text_len: int) -> Optional[str]:
        """The finish reason after the sequence's newest token, if any; trims a matched stop string
        (and what follows it) from ``seq.output_text``. ``prev_text_len`` is the text length before it."""
        params = seq.params
        token = seq.token_ids[-1]
        if (not params.ignore_eos and token in self.eos_token_ids) or token in params.stop_token_ids:
            return "stop"
        if params.stop_list:
            longest = max(len(s) for s in params.stop_list)
            start = max(prev_text_len - longest + 1, 0)
            hits = [i for i in (seq.output_text.find(s, start) for s in params.stop_list) if i >= 0]
            if hits:
                seq.output_text = seq.output_text[:min(hits)]
                return "stop"
        if seq.num_generated >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return "length"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        self.running.remove(seq)
        self.bm.free(seq)

    def abort(self, seqs: Iterable[Sequence]) -> None:
        for seq in seqs:
            if seq.status is SequenceStatus.RUNNING:
                self.running.remove(seq)
            elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
                self.waiting.remove(seq)
            if seq.block_table:
                self.bm.free(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = seq.finish_reason or "abort"
