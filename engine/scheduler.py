"""Continuous batching over one block table.

A step is a prefill step or, when there is nothing to prefill, all-decode over every running sequence.
A prefill step computes at most ``max_num_batched_tokens`` new tokens: first the next chunk of a
partially prefilled sequence, then waiting sequences admitted FCFS, whole, while the sequence limit, the
budget and the free blocks allow. Every decoding sequence rides along in it (one token each, budget kept
for them) when all of them can take a slot, so an arriving prompt does not stall the running ones; the
attention path reads them as prefills of one token. Only a step's first sequence is cut into chunks, so
at most one sequence is partially prefilled at a time; it holds blocks for all its tokens from admission on, and it
samples nothing until its last chunk. When a decode slot cannot be found, the most recently admitted
sequence is preempted by recompute (in a prefill step too: admissions leave the riding decodes their
slots, and a prompt prefilled in chunks gives way to them): its blocks are freed and it goes back to
the front of the queue with every token it has (recomputed in chunks like a prompt), so its output is
unchanged (the sampler's seed and offset depend only on the sequence, never on the batch).

A sequence whose request wants prompt_logprobs (prompt_logprobs.py) computes at most
PROMPT_LOGPROBS_TOKENS of its prompt's tokens a step (shared with the others of the step), so the first
of them may be cut below the budget, and a later one is admitted only whole within that limit.

A request of n samples is admitted into one slot: its prompt is prefilled once and its first step draws
all n first tokens (sequence.py). The samples that find a free slot run at once, sharing the prompt's
blocks; the others wait at the front of the queue, holding their first token and no block, and are
admitted as slots free like a preempted sequence (with prefix caching only the prompt's last partial
block and the first token are computed again). So a request with a large n never waits for n free
slots while the ones freed one by one idle, n may exceed max_num_seqs, and a waiting sample never
holds memory another sequence needs.

With speculative decoding (``lookahead`` γ > 0) a decode step is a round: each sequence's blocks also
cover the γ positions after its last token, where the small models write their drafts' K/V (as many for
every sequence, fewer near the context's end); the round's accepted tokens are appended at commit.

With ``policy="priority"`` (vLLM's scheduling policy) the queue is ordered by (request priority, arrival;
lower first) instead of arrival alone, preempted and waiting samples included, and the running sequence
preempted for a slot is the one last in that order (vLLM's victim), not the most recently admitted:
``running`` is kept in that order, so the victim is always its last sequence under either policy.

A request whose LoRA adapter waits for a slot is passed over until its adapter can be loaded, the requests
behind it admitted FCFS as ever (engine/lora_admission.py).

``schedule_ahead`` plans the step after one still running on the device (engine/schedule_ahead.py).
"""
from __future__ import annotations

import bisect
from collections import deque
from typing import Iterable, Optional

from rast_engine.block_manager import BlockManager
from rast_engine.lora_admission import LoraAdmission
from rast_engine.prompt_logprobs import pending as prompt_logprobs_pending
from rast_engine.schedule_ahead import ScheduleAhead
from rast_engine.scheduler_output import SchedulerOutput
from rast_engine.sequence import Sequence, SequenceStatus
from rast_engine.stop_rules import StopRules

# prompt tokens a prefill step may score for prompt_logprobs: each costs its full-vocabulary logits rows
# (every model's, plus float32 temporaries: ~2 GB at 1024 rows and V = 152064), which the KV cache's
# activation reserve does not hold for a whole token budget
PROMPT_LOGPROBS_TOKENS = 1024
POLICIES = ("fcfs", "priority")


def priority_key(seq: Sequence) -> tuple[int, int, int]:
    return seq.group.priority, seq.group.arrival, seq.index


class Scheduler(LoraAdmission, ScheduleAhead):
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: Iterable[int], named_eos_ids: Iterable[int] = (),
                 lookahead: int = 0, policy: str = "fcfs") -> None:
        """lookahead: the speculative drafts of a decode step (0: none); named_eos_ids: StopRules';
        policy: "fcfs" or "priority" (module docstring)."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.by_priority = policy == "priority"
        self.bm = block_manager
        self.lookahead = lookahead
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.stops = StopRules(max_model_len, frozenset(eos_token_ids), frozenset(named_eos_ids))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prompt_logprobs_tokens = PROMPT_LOGPROBS_TOKENS
        super().__init__()

    def add(self, seq: Sequence) -> None:
        self._wait(seq, front=False)

    def _wait(self, seq: Sequence, front: bool, at: int = 0) -> None:
        """Queue ``seq``: FCFS at the back, or at position ``at`` from the front (preempted, requeued and
        waiting samples); by priority, in its place in priority order."""
        if self.by_priority:
            at = bisect.bisect_right(self.waiting, priority_key(seq), key=priority_key)
        elif not front:
            at = len(self.waiting)
        self.waiting.insert(at, seq)
        self._lead_after_insert(at, seq)

    def _run(self, seq: Sequence) -> None:
        """``seq`` joins the running ones: last (FCFS), or in its place in priority order."""
        seq.status = SequenceStatus.RUNNING
        if self.by_priority:
            self.running.insert(bisect.bisect_right(self.running, priority_key(seq), key=priority_key), seq)
        else:
            self.running.append(seq)

    def add_samples(self, parent: Sequence, samples: list[Sequence], at: int = 0) -> int:
        """The samples forked from ``parent``'s prefilled row at its request's first draw, in index order:
        those that find a free slot run, sharing the parent's blocks; the rest wait, in order, at the
        front of the queue from position ``at`` (behind those an earlier fork of the same step queued),
        holding no block (module docstring). Returns how many wait."""
        free = max(self.max_num_seqs - len(self.running), 0)
        # a more urgent request waits: the samples queue behind it, not take the slots first (one that waits
        # for its adapter's slot could not take them)
        i = self._next_ready(0) if self.by_priority else -1
        head = self.waiting[i] if i >= 0 else None
        if samples and head is not None and priority_key(head) < priority_key(samples[0]):
            free = 0
        for seq in samples[:free]:
            self.bm.fork(parent, seq)
            self._run(seq)
        for i, seq in enumerate(samples[free:]):
            self._wait(seq, front=True, at=at + i)
        return len(samples[free:])

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Optional[SchedulerOutput]:
        self._lora_pass()
        out = self._schedule_prefill()
        if out.seqs:
            return out
        out = self._schedule_decode()
        return out if out.seqs else None

    def _schedule_prefill(self, decoding: Optional[list[Sequence]] = None) -> SchedulerOutput:
        """``decoding``: the sequences that ride along, whose slots are free (schedule_ahead's); by default
        every decoding one, the newest running sequences preempted until the others' slots are free when
        there is a prompt to prefill (else the decode step decides). Admissions leave those slots free:
        a prompt never stalls the running sequences."""
        if decoding is None:
            decoding = [s for s in self.running if s.num_uncomputed == 1]
            prefills = self.waiting or len(decoding) < len(self.running)
            if prefills and len(decoding) < self.max_num_batched_tokens:
                decoding = self._keep_slots(decoding)
        budget = self.max_num_batched_tokens - len(decoding)
        if budget <= 0:  # the decodes alone fill a step: no room to ride along, prefill gets it all
            budget, decoding = self.max_num_batched_tokens, []
        reserve = self.bm.append_need_all(decoding)
        scheduled: list[Sequence] = []
        tokens = scored = 0  # scored: tokens whose logits prompt_logprobs needs
        for seq in self.running:  # the partially prefilled one: its blocks and slots are already taken
            scores = prompt_logprobs_pending(seq.group)
            room = min(budget - tokens, self.prompt_logprobs_tokens - scored if scores else budget)
            if seq.num_uncomputed > 1 and room > 0:
                seq.num_scheduled_tokens = min(seq.num_uncomputed, room)
                scheduled.append(seq)
                tokens += seq.num_scheduled_tokens
                scored += seq.num_scheduled_tokens if scores else 0
        slots = len(self.running)
        i = 0  # the waiting sequences before i wait for their adapter's slot
        # a full batch admits no one: no adapter is loaded (and another evicted) for a request that cannot run
        while tokens < budget and slots < self.max_num_seqs and (i := self._with_lora_slot(i)) >= 0:
            seq = self.waiting[i]
            # only a step's first sequence is split: the others fit whole, their prefix-cache hits aside
            # (a sample that found no slot at its fork, or a preempted sequence, recomputes little); the
            # hits are looked up only when the whole length would not fit
            if scheduled and tokens + len(seq.token_ids) > budget and tokens + self._uncached(seq) > budget:
                break
            scores = prompt_logprobs_pending(seq.group)  # then it takes no cache hits (block_manager.py)
            cap = self.prompt_logprobs_tokens
            if scores and (cap <= scored or scheduled and scored + len(seq.token_ids) > cap):
                break
            if not self._fits(seq, slots, reserve):
                break
            if seq.group.lora_pending is not None:  # admitted now: only now may its load evict an idle adapter
                self._load_lora(seq.group.lora_pending)
            self.bm.allocate(seq)
            seq.group.admitted = True
            del self.waiting[i]  # i >= _lead: no _lead update (LoraAdmission._lead_after_removal)
            self._run(seq)
            scheduled.append(seq)
            seq.num_scheduled_tokens = min(seq.num_uncomputed, budget - tokens, cap - scored if scores else budget)
            tokens += seq.num_scheduled_tokens
            scored += seq.num_scheduled_tokens if scores else 0
            slots += 1
        copies: list[tuple[int, int]] = []
        if scheduled and decoding and self.bm.can_append_all(decoding):
            for seq in decoding:
                copy = self.bm.append_slot(seq)
                if copy is not None:
                    copies.append(copy)
                seq.num_scheduled_tokens = 1
            scheduled = decoding + scheduled
        return SchedulerOutput(scheduled, True, copies)

    def _schedule_decode(self) -> SchedulerOutput:
        # a speculative round drafts as many tokens for every sequence, as many as its context has room for
        # with the token after them (a round adds up to lookahead + 1); a step that makes a request's first
        # draw (a prompt whose last chunk stopped one short) decodes plainly
        lookahead = 0
        if self.lookahead and self.running and all(s.group.forked for s in self.running):
            room = min(self.stops.max_model_len - len(s.token_ids) - 1 for s in self.running)
            lookahead = max(min(self.lookahead, room), 0)
        scheduled: list[Sequence] = []
        copies: list[tuple[int, int]] = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if seq.num_uncomputed != 1:
                raise RuntimeError(f"sequence {seq.seq_id} has {seq.num_uncomputed} uncomputed tokens in a "
                                   "decode step; a partial prefill must be finished first")
            while not self.bm.can_append(seq, lookahead):
                victim = self.running.pop()  # always behind i, or seq itself
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                copy = self.bm.append_slot(seq, lookahead)
                if copy is not None:
                    copies.append(copy)
                seq.num_scheduled_tokens = 1
                scheduled.append(seq)
                i += 1
                continue
            break
        return SchedulerOutput(scheduled, False, copies, lookahead)

    def _fits(self, seq: Sequence, slots: int, reserve: int) -> bool:
        """Whether a waiting sequence can be admitted beside ``slots`` taken slots: a slot, and blocks
        for all its tokens beside the ``reserve`` the decoding sequences' next slots need (for all of them,
        no hit counted, when its adapter waits for its load: see LoraAdmission._uncached)."""
        cached = seq.group.lora_pending is None
        return slots < self.max_num_seqs and self.bm.can_allocate(seq, use_cache=cached, reserve=reserve)

    def _keep_slots(self, decoding: list[Sequence]) -> list[Sequence]:
        """Those of ``decoding`` left once the most recently admitted sequences (decoding, or a prompt
        partly prefilled) are preempted until the rest can take their next slots."""
        while decoding and not self.bm.can_append_all(decoding):
            victim = self.running.pop()
            self._preempt(victim)
            decoding = [s for s in decoding if s is not victim]
        return decoding

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.reset_for_recompute()
        self._wait(seq, front=True)
        self.num_preemptions += 1

    def requeue(self, seqs: list[Sequence]) -> None:
        """Undo a step that failed in the runner: its sequences give their blocks back and wait, in order,
        at the front of the queue, to be recomputed from their tokens (what the failed step may have
        written, or failed to copy, is never read)."""
        for seq in reversed(seqs):
            self.running.remove(seq)
            self.bm.free(seq)
            seq.reset_for_recompute()
            self._wait(seq, front=True)

    def _leave(self, seq: Sequence) -> None:
        """Take an unfinished sequence out of the list its status names."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
            self._lead_after_removal(seq)

    def _retire(self, seq: Sequence) -> None:
        """Out of its list, its KV blocks freed and its device-side state dropped: a sample's [V] penalty
        counts too, so a request of n samples holds them for the running ones only, not all n."""
        self._leave(seq)
        if seq.block_table:
            self.bm.free(seq)
        seq.drop_pending()
        seq.output_counts = None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Running, or waiting: after a preemption (a stop string can be read after the step that
        preempted it was scheduled, see LLMEngine.step), or a sample that found no slot, by its first
        token."""
        self._retire(seq)
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED

    def abort(self, seqs: Iterable[Sequence]) -> None:
        for seq in seqs:
            self._retire(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = seq.finish_reason or "abort"
