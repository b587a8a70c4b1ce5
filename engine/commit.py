"""Taking a finished step's sampled tokens into its sequences (a speculative round's: speculative/round.py).

Sequences that stop by token finish here, so the next batch leaves them out; the rest wait in
``deferred`` for their text (async_output only). Sequences that finished or were aborted while the batch
ran drop their draws. A prompt's last chunk forks a request of n samples into its n sequences here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from rast_engine.pending import DrawResult, InFlight
from rast_engine.sequence import Sequence, SequenceGroup, SequenceStatus

if TYPE_CHECKING:
    from rast_engine.llm_engine import LLMEngine


def commit_step(engine: LLMEngine, batch: InFlight, results: list[DrawResult]
                ) -> tuple[dict[str, SequenceGroup], list[Sequence]]:
    """(the groups that progressed by request id, the sequences whose text waits) for a plain step."""
    progressed: dict[str, SequenceGroup] = {}
    deferred: list[Sequence] = []
    k = 0
    forks_queued: list[Sequence] = []  # samples of this batch's forks that found no slot, in fork order
    for (seq, count), holds in zip(batch.owners, batch.holding):
        mine, k = results[k:k + count], k + count
        if seq.status is not SequenceStatus.RUNNING:
            continue
        g = seq.group
        if holds:  # computed and counted at launch: only the id was missing
            seq.resolve_pending(mine[0].token_id, mine[0].logprobs)
            engine.block_manager.register_computed(seq)
            targets = [seq]
        else:
            seq.num_computed_tokens += seq.num_scheduled_tokens
            engine.block_manager.register_computed(seq)
            if seq.num_uncomputed:
                continue
            if not g.forked:
                targets = [seq] + [engine._new_sequence(g, j, list(seq.token_ids)) for j in range(1, g.params.n)]
                g.seqs += targets[1:]
                # behind the earlier forks' samples still waiting: one that ended by its first token has left
                at = sum(s.status is SequenceStatus.WAITING for s in forks_queued)
                engine.scheduler.add_samples(seq, targets[1:], at)
                forks_queued += [s for s in targets[1:] if s.status is SequenceStatus.WAITING]
                g.forked = True
            else:
                targets = [seq]
            for target, result in zip(targets, mine):
                target.append_token(result.token_id, result.logprobs)
        if not g.prompt_counted:  # prefilled: a prompt refused, aborted or timed out in the queue is never counted
            g.prompt_counted = True
            engine._prompt_tokens += len(g.prompt_token_ids)
        for target in targets:
            engine._generation_tokens += 1
            if engine.async_output and not engine.scheduler.stops.ends_by_token(target):
                deferred.append(target)
            else:
                engine._read_text(target)
        progressed[g.request_id] = g
    return progressed, deferred
