"""Structured outputs inside a speculative round: each position's grammar mask, with the matcher walked
over the drafts before it.

Position j's mask is the one plain decoding would use had the j drafts before it been accepted: the
sequence's matcher (brought up to date with its output) is forked, and the fork accepts draft 0, 1, ...
in turn. The draft step at position j and the verify's position j read the same mask, so each is
computed once a round. The sequence's own matcher is never walked: it is fed the tokens the round emits
at its next draw, so a round that fails leaves it as it was.

Each draft is copied to the host as soon as it is drawn (pinned, non-blocking, with an event): the mask
it leads to is computed while the next small-model forward, or the large model's verify, runs. A draft
the grammar refuses (the draft admitted no token, read as token 0) ends the walk: the target's draw at
that position is masked by the same grammar, so no later position of the row is emitted, and their masks
only have to exist.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence as Seq

import torch

from rast_engine.logit_adjust import ToDevice
from rast_engine.sequence import Sequence
from rast_engine.structured import bitmasks, draw_bitmasks, unpack


class RoundGrammars:
    """The structured-output rows among a round's adjusted rows: ``rows`` their indices there, ``seqs``
    their sequences, ``draw_rows`` their rows in the round's batch."""

    def __init__(self, rows: list[int], seqs: Seq[Sequence], draw_rows: list[int], vocab: int,
                 to_device: ToDevice) -> None:
        self.rows, self.seqs, self.vocab, self.to_device = rows, list(seqs), vocab, to_device
        self.draw_rows = to_device(torch.tensor(draw_rows, dtype=torch.int64))
        self.masks: list[torch.Tensor] = []  # position -> int32 host bitmasks [G, words]
        # position -> bool [G, V] on the device: a draft step's, read again by the verify
        self.kept: list[torch.Tensor] = []
        self.walks: list[Any] = []  # each row's forked matcher, at the last computed position
        self.following: list[bool] = []  # the walk accepted every draft so far
        self.drafts: list[tuple[torch.Tensor, Optional[torch.cuda.Event]]] = []  # host copies, in flight

    def note_draft(self, ids: torch.Tensor) -> None:
        """Start copying a draft step's ids [R] (the batch's) of these rows to the host."""
        picked = ids.index_select(0, self.draw_rows)
        if not picked.is_cuda:
            self.drafts.append((picked, None))
            return
        host = torch.empty(picked.shape, dtype=picked.dtype, pin_memory=True)
        host.copy_(picked, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.drafts.append((host, event))

    def mask(self, position: int) -> torch.Tensor:
        """int32 host bitmasks [G, words] of ``position`` (0: the token after the sequence's last one);
        every draft before it noted."""
        while len(self.masks) <= position:
            if not self.masks:  # the sequences' matchers brought up to date with their outputs, then forked
                self.masks.append(draw_bitmasks([(seq, False) for seq in self.seqs]))
                self.walks = [seq.matcher.matcher.fork() for seq in self.seqs]
                self.following = [True] * len(self.walks)
                continue
            host, event = self.drafts[len(self.masks) - 1]
            if event is not None:
                event.synchronize()
            for g, (walk, token) in enumerate(zip(self.walks, host.tolist())):
                # a terminated matcher takes no token (plain decoding feeds it none): stop tokens only, again
                if self.following[g] and not walk.is_terminated():
                    self.following[g] = walk.accept_token(token)
            masks = self.masks[-1].clone()  # a row the walk left keeps any mask: nothing of it is emitted
            on = [g for g, f in enumerate(self.following) if f]
            if on:
                masks[on] = bitmasks(self.seqs[0].group.grammar.grammars, [self.walks[g] for g in on])
            self.masks.append(masks)
        return self.masks[position]

    def keep(self, position: int) -> torch.Tensor:
        """bool [G, V] on the device: the tokens ``position``'s masks allow (each position sent once)."""
        while len(self.kept) <= position:
            self.kept.append(unpack(self.to_device(self.mask(len(self.kept))), self.vocab))
        return self.kept[position]
