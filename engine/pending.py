"""A step's draws on their way to the host, and the engine's record of a launched batch (InFlight).

A launched step returns a PendingStep at once; its sampled ids (and the logprobs some draws asked for)
are device tensors copied to pinned host memory by non_blocking copies, with one event recorded after
the last of them. ``wait()`` waits for that event and reads them: the step's one device-to-host transfer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from rast_engine.errors import NoAdmissibleToken
from rast_engine.prompt_logprobs import PromptLogprobs
from rast_engine.scheduler import SchedulerOutput
from rast_engine.sequence import Sequence


@dataclass
class DrawResult:
    token_id: int
    logprobs: Optional[dict[int, float]]  # chosen token first, then the top-k alternatives


@dataclass
class DrawLogprobs:
    """Logprobs of the draws that asked for them: the drawn token's, and the top alternatives'."""
    want: list[int]  # indices of those draws
    counts: list[int]  # alternatives each asked for
    chosen: torch.Tensor  # [W] logprob of each drawn token
    top_val: torch.Tensor  # [W, k], k = max(counts), descending
    top_ids: torch.Tensor  # [W, k] int64

    def to_host(self) -> DrawLogprobs:
        """The same on the CPU, by non_blocking copies into pinned memory (the caller records the event
        that ends them)."""
        chosen, top_val, top_ids = (t.to("cpu", non_blocking=True) for t in (self.chosen, self.top_val, self.top_ids))
        return DrawLogprobs(self.want, self.counts, chosen, top_val, top_ids)

    def fill(self, results: list[DrawResult]) -> None:
        chosen, top_val, top_ids = self.chosen.tolist(), self.top_val.tolist(), self.top_ids.tolist()
        for r, (j, count) in enumerate(zip(self.want, self.counts)):
            entry = {results[j].token_id: chosen[r]}
            for tid, val in zip(top_ids[r][:count], top_val[r][:count]):
                if val > float("-inf"):  # filtered-out tokens are not alternatives
                    entry.setdefault(tid, val)
            results[j].logprobs = entry


class PendingStep:
    """A step's draws, maybe still on their way to the host: ``wait()`` returns them, reading the ids
    (and logprobs) after the copies' event, once."""

    def __init__(self, results: Optional[list[DrawResult]] = None, *, ids: Optional[torch.Tensor] = None,
                 event: Optional[torch.cuda.Event] = None, logprobs: Optional[DrawLogprobs] = None) -> None:
        if (results is None) == (ids is None):
            raise ValueError("a PendingStep holds either its results or the ids they come from")
        self._results, self._ids, self._event, self._logprobs = results, ids, event, logprobs
        self.prompt: Optional[PromptLogprobs] = None  # the step's prompt logprobs, written into their requests by wait()

    @property
    def done(self) -> bool:
        """Whether the results are on the host already (a step not in flight)."""
        return self._results is not None

    def wait(self, counted: Callable[[list[int]], list[int]] = list) -> list[DrawResult]:
        """The draws' results; NoAdmissibleToken for draws that found no token, those ``counted`` keeps
        of them (the engine drops the rows of sequences that stopped running since the launch: their ids
        are discarded). It is called only when some draw failed, so a step pays nothing for it."""
        if self._results is None:
            if self._event is not None:
                self._event.synchronize()
            ids = self._ids.tolist()
            failed = [j for j, i in enumerate(ids) if i < 0]
            if failed and (failed := counted(failed)):
                raise NoAdmissibleToken(failed)
            results = [DrawResult(i, None) for i in ids]
            if self._logprobs is not None:
                self._logprobs.fill(results)
            self._results = results
        if self.prompt is not None:  # after the ids' check: an undone step reports nothing
            self.prompt.fill()
            self.prompt = None
        return self._results


@dataclass
class InFlight:
    """A launched batch: the scheduler's output, each sequence with its number of draws, the step's ids
    on their way, and per sequence whether it holds a pending token for its draw (see sequence.py)."""
    out: SchedulerOutput
    owners: list[tuple[Sequence, int]]
    step: PendingStep
    holding: list[bool]

    @property
    def holds_pending(self) -> bool:
        return any(self.holding)
