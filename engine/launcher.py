"""Starting scheduled batches on the runner (LLMEngine's mixin): the next batch once the last one's tokens
are known, and with async_scheduling the batch after one still on the device, scheduled ahead of its ids
(Scheduler.schedule_ahead), the device feeding each sampled id into it. A batch whose launch fails is
requeued: its sequences give back their blocks and wait to be recomputed.
"""
from __future__ import annotations

from typing import Optional

from rast_engine.draws import step_draws
from rast_engine.model_runner import ModelRunner
from rast_engine.pending import InFlight
from rast_engine.scheduler import Scheduler
from rast_engine.scheduler_output import SchedulerOutput
from rast_engine.sequence import Sequence, SequenceStatus
from rast_engine.speculative.round import PendingRound


class Launcher:
    """Mixed into LLMEngine: its scheduler's batches launched on its runner."""
    scheduler: Scheduler
    runner: ModelRunner
    async_scheduling: bool

    @classmethod
    def _running_rows(cls, batch: InFlight, rows: list[int]) -> list[int]:
        """Those of a batch's failed result ``rows`` whose sequences still run: the draws of sequences
        aborted or finished since the launch are discarded, so one that found no token undoes nothing."""
        owners = cls._row_owners(batch)
        return [r for r in rows if owners[r].status is SequenceStatus.RUNNING]

    @staticmethod
    def _row_owners(batch: InFlight) -> list[Sequence]:
        """The sequence of each of a batch's result rows: a round's rows are its sequences, a step's its draws."""
        if isinstance(batch.step, PendingRound):
            return list(batch.out.seqs)
        return [seq for seq, count in batch.owners for _ in range(count)]

    def _launch(self) -> Optional[InFlight]:
        """Schedule a batch and start it (None: nothing to run)."""
        out = self.scheduler.schedule()
        return None if out is None else self._start(out)

    def _launch_ahead(self, batch: InFlight) -> Optional[InFlight]:
        """Schedule and start the step after ``batch`` before its ids are known (None: it must wait)."""
        row, k = {}, 0  # each sequence's draw: its row of the batch's sampled ids
        for seq, count in batch.owners:
            row[seq], k = k, k + count
        # a batch whose forks drew more ids than the device keeps (DecodeBuffers.store_sampled) can only
        # be followed ahead when the ids to feed are among those kept: a fork's parent normally stops
        # schedule_ahead anyway, unless it was aborted meanwhile
        kept = self.runner.buffers.max_rows
        if any(holds and row[seq] >= kept for (seq, _), holds in zip(batch.owners, batch.holding)):
            return None
        if any(seq.params.reads_output for seq, _ in batch.owners):  # its next draw reads this one's token on the host
            return None
        out = self.scheduler.schedule_ahead()
        if out is None:
            return None
        # -1: a sequence admitted by this step, whose input tokens are all known
        return self._start(out, feed=[row[s] if s.num_pending else -1 for s in out.seqs])

    def _start(self, out: SchedulerOutput, feed: Optional[list[int]] = None) -> InFlight:
        draws, owners = step_draws(out.seqs, self.scheduler.stops.eos_token_ids)
        try:
            step = self.runner.launch(out.seqs, out.is_prefill, out.copies, draws, feed, out.lookahead)
        except BaseException:
            self.scheduler.requeue(out.seqs)
            raise
        holding = [False] * len(owners)
        if self.async_scheduling and not step.done:
            for i, (seq, count) in enumerate(owners):
                # one draw of its own: a decode, or a first draw of n = 1 (whose fork makes no sample and
                # draws with the sequence's own seed and offset 0, so it counts as forked now); a first
                # draw of n > 1 forks at commit, and a chunk short of the end draws nothing
                if count == 1 and (seq.group.forked or seq.params.n == 1):
                    seq.group.forked = True
                    seq.add_pending()
                    holding[i] = True
        return InFlight(out, owners, step, holding)
