"""A scheduled step: its sequences, their block copies and its speculative lookahead (Scheduler's output)."""
from __future__ import annotations

from dataclasses import dataclass, field

from rast_engine.sequence import Sequence


@dataclass
class SchedulerOutput:
    seqs: list[Sequence]
    is_prefill: bool
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) block pairs
    lookahead: int = 0  # a decode step's speculative drafts a sequence (their slots are writable)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.seqs)
