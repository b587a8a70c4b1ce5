"""Logit adjustments (engine/logit_adjust.py) inside a speculative round.

Position j of a round (0: the token after the sequence's last one; j: the token after j drafts) is adjusted
as plain decoding would adjust the draw there had the j drafts before it been accepted. Only then is a
target token that a round emits the plain sampler's token, because a position's token counts only when
every draft before it passed. The draft distributions are adjusted the same way, on their own logits.
Any draft distribution keeps the round exact, so this only keeps drafts likely to pass; a draft that
allowed_token_ids or a bad word forbids would otherwise be drawn and always fail.

What depends on the drafts is computed on the device, so a round still reads its tokens back once:
- the penalties' output counts are the sequence's counts plus one for each earlier draft;
- a bad word of several tokens is matched against the output's tail followed by the earlier drafts.
  The tail is padded with -1 where the prompt begins, since a bad word's prefix must lie in the output
  (vLLM's rule, as in plain decoding).
What does not depend on the drafts is known on the host: logit_bias, allowed_token_ids, one-token bad
words, and min_tokens' bans, which hold at position j while generated + j < min_tokens.
Structured outputs would need the grammar matcher advanced over each draft on the host, between the draft
steps, so a batch holding one decodes in plain steps (Scheduler._schedule_decode). An adjusted round runs eagerly
(the round's CUDA graph reads a fixed set of pairs), as an adjusted plain step samples eagerly.
"""
from __future__ import annotations

from typing import Optional, Sequence as Seq, Union

import torch

from rast_engine.draws import Draw
from rast_engine.logit_adjust import (Adjust, ToDevice, adjustment_pair, bias_and_ban, combined, draw_counts,
                                      penalize)
from rast_engine.sequence import Sequence

Pairs = list[tuple[torch.Tensor, torch.Tensor]]


class RoundAdjust:
    """The adjustments of a round's adjusted rows (draw i belongs to sequence i). Each call of ``extend``
    appends the adjustment pair of ``count`` positions a row; the draft steps' pairs are kept, because the
    rejection method's q must be the distribution its drafts were drawn from."""

    def __init__(self, seqs: Seq[Sequence], draws: Seq[Draw], vocab: int, to_device: ToDevice) -> None:
        self.rows = [i for i, d in enumerate(draws) if d.adjust is not None]
        ds = [draws[i] for i in self.rows]
        if any(d.adjust.grammar_mask is not None for d in ds):
            raise RuntimeError("a structured output in a speculative round: the scheduler decodes those plainly")
        self.num_rows, self.vocab, self.to_device = len(draws), vocab, to_device
        self.params = [d.params for d in ds]
        self.adjusts: list[Adjust] = [d.adjust for d in ds]
        self.generated = [seqs[i].num_generated for i in self.rows]
        self.counts = draw_counts(ds, vocab, to_device)  # [V] each, None where not penalized
        self.words = [self._words(seqs[i]) for i in self.rows]
        self.draft_pairs: list[list[torch.Tensor]] = []

    @staticmethod
    def build(seqs: Seq[Sequence], draws: Seq[Draw], vocab: int, to_device: ToDevice) -> Optional[RoundAdjust]:
        return RoundAdjust(seqs, draws, vocab, to_device) if any(d.adjust is not None for d in draws) else None

    def _words(self, seq: Sequence) -> Optional[tuple[torch.Tensor, list[list[int]]]]:
        """A sequence's bad words of several tokens, with its output's last (longest - 1) tokens on the
        device, -1 where the output is shorter; None without such words."""
        words = [w for w in seq.params.bad_words_token_ids or () if len(w) > 1]
        if not words:
            return None
        width = max(map(len, words)) - 1
        output = seq.token_ids[seq.num_prompt_tokens:][-width:]
        return self.to_device(torch.tensor([-1] * (width - len(output)) + output, dtype=torch.int64)), words

    def _bad_word_bans(self, a: int, first: int, count: int, drafts: torch.Tensor) -> Optional[torch.Tensor]:
        """[count, V] bool: the last token of each bad word whose other tokens end row a's context at
        positions first .. first + count - 1 (None: the row has no bad word of several tokens)."""
        if self.words[a] is None:
            return None
        tail, words = self.words[a]
        ctx = torch.cat([tail, drafts[self.rows[a]]])  # position j's context ends at index len(tail) + j
        hits = torch.zeros(count, self.vocab, dtype=torch.float32, device=ctx.device)
        for n in sorted({len(w) for w in words}):
            group = [w for w in words if len(w) == n]
            prefixes = self.to_device(torch.tensor([w[:-1] for w in group], dtype=torch.int64))
            lasts = self.to_device(torch.tensor([w[-1] for w in group], dtype=torch.int64))
            start = len(tail) - (n - 1) + first
            windows = ctx.unfold(0, n - 1, 1)[start:start + count]  # [count, n - 1]
            match = (windows[:, None, :] == prefixes[None]).all(-1)  # [count, words]
            at = torch.arange(count, device=ctx.device)[:, None].expand_as(match)
            hits.index_put_((at.reshape(-1), lasts.expand_as(match).reshape(-1)), match.reshape(-1).float(),
                            accumulate=True)  # two words may share a last token: count, never overwrite
        return hits > 0

    def _counts(self, a: int, first: int, count: int, drafts: torch.Tensor) -> list[Optional[torch.Tensor]]:
        """Row a's output counts at each position: its sequence's, plus the drafts before the position."""
        base = self.counts[a]
        if base is None:
            return [None] * count
        c = base[None].repeat(count, 1)
        at = [(k, t) for k in range(count) for t in range(first + k)]  # draft t precedes position first + k
        if at:
            ks, ts = (self.to_device(torch.tensor(x, dtype=torch.int64)) for x in zip(*at))
            c.index_put_((ks, drafts[self.rows[a]].index_select(0, ts)), torch.ones_like(ks, dtype=torch.float32),
                         accumulate=True)
        return list(c.unbind(0))

    def extend(self, logits: torch.Tensor, deltas: Pairs, weights: Union[torch.Tensor, float], first: int, count: int,
               drafts: torch.Tensor, keep: bool = False) -> tuple[Pairs, torch.Tensor]:
        """(deltas, weights) with the adjustment pair of positions first .. first + count - 1 appended: rows
        of ``logits`` in (sequence, position) order, ``count`` a sequence; ``drafts`` [sequences, >= first +
        count - 1] int64, each row's drafts so far. ``keep``: remember the pair (a draft step's)."""
        n = self.num_rows * count
        if not isinstance(weights, torch.Tensor):
            weights = torch.full((n, len(deltas)), float(weights), dtype=torch.float32, device=logits.device)
        rows = [i * count + k for i in self.rows for k in range(count)]
        at = self.to_device(torch.tensor(rows, dtype=torch.int64))
        z = combined([t.index_select(0, at) for pair in [(logits,)] + deltas for t in pair],
                     weights.index_select(0, at), self.vocab)
        adjusted = z.clone()
        adjusts, params, requests, counts = [], [], [], []
        for a, adjust in enumerate(self.adjusts):
            for k in range(count):
                short = self.generated[a] + first + k < self.params[a].min_tokens
                fixed = [w[0] for w in self.params[a].bad_words_token_ids or () if len(w) == 1]
                banned = list(dict.fromkeys(fixed + (adjust.min_tokens_ids if short else [])))
                adjusts.append(Adjust(adjust.request, banned, None))
            params += [self.params[a]] * count
            requests += [adjust.request] * count
            counts += self._counts(a, first, count, drafts)
        bias_and_ban(adjusted, adjusts, self.vocab, self.to_device)
        for a in range(len(self.rows)):
            bans = self._bad_word_bans(a, first, count, drafts)
            if bans is not None:
                block = adjusted[a * count:(a + 1) * count]
                block.masked_fill_(bans, float("-inf"))
        penalize(adjusted, params, requests, counts, self.vocab, self.to_device)
        pair = adjustment_pair(z, adjusted, at, n)
        if keep:
            self.draft_pairs.append(pair)
        ones = torch.ones(n, 1, dtype=torch.float32, device=weights.device)
        return deltas + [(pair[0], pair[1])], torch.cat([weights, ones], dim=1)

    def draft_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept draft steps' pairs as one pair over rows in (sequence, draft) order."""
        bias = torch.stack([p[0] for p in self.draft_pairs], dim=1).flatten(0, 1)
        return bias, torch.zeros(1, bias.shape[1], dtype=torch.float32, device=bias.device).expand(bias.shape[0], -1)
