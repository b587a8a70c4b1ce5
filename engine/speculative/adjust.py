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
plausibility_alpha's mask reads M's logits, so only the verify applies it (drafts are drawn without M):
a draft M finds implausible has target probability 0 and fails.
Structured outputs' masks are the exception: a grammar matcher lives on the host, so each draft of such a
row is copied back as it is drawn and the matcher walked over it (grammar.py), while the next forward runs.
An adjusted round runs eagerly (the round's CUDA graph reads a fixed set of pairs), as an adjusted plain
step samples eagerly.
"""
from __future__ import annotations

from typing import Optional, Sequence as Seq, Union

import torch

from rast_engine.draws import Draw
from rast_engine.logit_adjust import (Adjust, ToDevice, adjustment_pair, bias_and_ban, bias_pair, combined,
                                      draw_counts, keep_only, penalize)
from rast_engine.plausibility import mask_implausible
from rast_engine.sequence import Sequence
from rast_engine.speculative.grammar import RoundGrammars

Pairs = list[tuple[torch.Tensor, torch.Tensor]]


def with_pair(deltas: Pairs, weights: Union[torch.Tensor, float], rows: int, pair: list[torch.Tensor],
              device: torch.device) -> tuple[Pairs, torch.Tensor]:
    """rast_sample's (deltas, weights [rows, K + 1]) with ``pair`` appended at weight 1 (``weights``: the
    K pairs' [rows, K], or one λ for all of them)."""
    if not isinstance(weights, torch.Tensor):
        weights = torch.full((rows, len(deltas)), float(weights), dtype=torch.float32, device=device)
    return deltas + [(pair[0], pair[1])], torch.cat([weights, weights.new_ones(rows, 1)], dim=1)


class RoundAdjust:
    """The adjustments of a round's adjusted rows (draw i belongs to sequence i). Each call of ``extend``
    appends the adjustment pair of ``count`` positions a row; the draft steps' pairs are kept, because the
    rejection method's q must be the distribution its drafts were drawn from."""

    def __init__(self, seqs: Seq[Sequence], draws: Seq[Draw], vocab: int, device: torch.device,
                 to_device: ToDevice) -> None:
        self.rows = [i for i, d in enumerate(draws) if d.adjust is not None]
        ds = [draws[i] for i in self.rows]
        structured = [a for a, d in enumerate(ds) if d.adjust.grammar is not None]
        self.grammars = RoundGrammars(structured, [seqs[self.rows[a]] for a in structured],
                                      [self.rows[a] for a in structured], vocab, to_device) if structured else None
        self.num_rows, self.vocab, self.to_device = len(draws), vocab, to_device
        self.params = [d.params for d in ds]
        self.adjusts: list[Adjust] = [d.adjust for d in ds]
        self.generated = [seqs[i].num_generated for i in self.rows]
        counts = draw_counts(ds, vocab, to_device)  # [V] each, None where not penalized
        self.penalized = [a for a, c in enumerate(counts) if c is not None]
        self.base_counts = torch.stack([counts[a] for a in self.penalized]) if self.penalized else None
        self.penalized_draws = to_device(torch.tensor([self.rows[a] for a in self.penalized], dtype=torch.int64))
        self.bad_words = _BadWords([seqs[i] for i in self.rows], self.rows, to_device)
        # what every position of a row shares: -inf outside allowed_token_ids and at one-token bad words,
        # logit_bias at its tokens, 0 elsewhere
        self.fixed = torch.zeros(len(self.rows), vocab, dtype=torch.float32, device=device)
        bias_and_ban(self.fixed, [Adjust(a.request, [w[0] for w in p.bad_words_token_ids or () if len(w) == 1], None)
                                  for a, p in zip(self.adjusts, self.params)], vocab, to_device)
        self.draft_pairs: list[list[torch.Tensor]] = []

    @staticmethod
    def build(seqs: Seq[Sequence], draws: Seq[Draw], vocab: int, device: torch.device, to_device: ToDevice
              ) -> Optional[RoundAdjust]:
        return RoundAdjust(seqs, draws, vocab, device, to_device) if any(d.adjust is not None for d in draws) else None

    def _counts(self, first: int, count: int, drafts: torch.Tensor) -> list[Optional[torch.Tensor]]:
        """Each adjusted row's output counts [V] at each of ``count`` positions, in (row, position) order:
        its sequence's, plus one for each draft before the position (None where not penalized)."""
        out: list[Optional[torch.Tensor]] = [None] * (len(self.rows) * count)
        if self.base_counts is None:
            return out
        c = self.base_counts.repeat_interleave(count, dim=0)  # [P * count, V]
        before = [(k, t) for k in range(count) for t in range(first + k)]  # draft t precedes position first + k
        if before:
            ks, ts = (self.to_device(torch.tensor(x, dtype=torch.int64)) for x in zip(*before))
            at = (torch.arange(len(self.penalized), device=c.device)[:, None] * count + ks).reshape(-1)
            tokens = drafts.index_select(0, self.penalized_draws).index_select(1, ts).reshape(-1)
            c.index_put_((at, tokens), torch.ones_like(tokens, dtype=torch.float32), accumulate=True)
        for j, a in enumerate(self.penalized):
            out[a * count:(a + 1) * count] = c[j * count:(j + 1) * count].unbind(0)
        return out

    def extend(self, logits: torch.Tensor, deltas: Pairs, weights: Union[torch.Tensor, float], first: int, count: int,
               drafts: torch.Tensor, keep: bool = False) -> tuple[Pairs, torch.Tensor]:
        """(deltas, weights) with the adjustment pair of positions first .. first + count - 1 appended: rows
        of ``logits`` in (sequence, position) order, ``count`` a sequence; ``drafts`` [sequences, >= first +
        count - 1] int64, each row's drafts so far. ``keep``: remember the pair (a draft step's)."""
        n = self.num_rows * count
        rows = [i * count + k for i in self.rows for k in range(count)]
        at = self.to_device(torch.tensor(rows, dtype=torch.int64))
        lam = weights.index_select(0, at) if isinstance(weights, torch.Tensor) else \
            torch.full((len(rows), len(deltas)), float(weights), dtype=torch.float32, device=logits.device)
        picked = [t.index_select(0, at) for pair in [(logits,)] + deltas for t in pair]  # adjusted rows only
        z = combined(picked, lam, self.vocab)
        # z + (-inf or a bias or 0): the masks and logit_bias as bias_and_ban applies them, in one add
        adjusted = z + self.fixed.repeat_interleave(count, dim=0)
        if self.grammars is not None:  # host masks: this waits for the drafts before the last position
            allowed = torch.stack([self.grammars.keep(first + k) for k in range(count)], dim=1)  # [G, count, V]
            keep_only(adjusted, [a * count + k for a in self.grammars.rows for k in range(count)],
                      allowed.flatten(0, 1), self.to_device)
        params, requests = [], []
        short_rows, short_ids = [], []  # min_tokens' bans where generated + position < min_tokens
        for a, adjust in enumerate(self.adjusts):
            stops = [t for t in adjust.min_tokens_ids if t < self.vocab]  # as bias_and_ban drops the others
            for k in range(count):
                if self.generated[a] + first + k < self.params[a].min_tokens:
                    short_rows += [a * count + k] * len(stops)
                    short_ids += stops
            params += [self.params[a]] * count
            requests += [adjust.request] * count
        if short_ids:
            adjusted.index_put_((self.to_device(torch.tensor(short_rows, dtype=torch.int64)),
                                 self.to_device(torch.tensor(short_ids, dtype=torch.int64))),
                                torch.full((), float("-inf"), device=adjusted.device))
        if self.bad_words.rows is not None:
            blocks = adjusted.view(len(self.rows), count, self.vocab)  # a view: rows in (row, position) order
            at_rows = self.bad_words.rows
            blocks[at_rows] = blocks[at_rows].masked_fill(self.bad_words.bans(first, count, drafts, self.vocab),
                                                          float("-inf"))
        if not keep:  # the verify's: M's own plausibility; drafts are proposals, drawn without M
            mask_implausible(adjusted, picked[0], params, self.vocab, self.to_device)
        penalize(adjusted, params, requests, self._counts(first, count, drafts), self.vocab, self.to_device)
        pair = adjustment_pair(z, adjusted, at, n)
        if keep:
            self.draft_pairs.append(pair)
        return with_pair(deltas, weights, n, pair, logits.device)

    def note_draft(self, ids: torch.Tensor) -> None:
        """A draft step's ids [R], drawn: structured rows read them for the next position's mask."""
        if self.grammars is not None:
            self.grammars.note_draft(ids)

    def draft_pair(self) -> list[torch.Tensor]:
        """The kept draft steps' pairs as one pair over rows in (sequence, draft) order."""
        return bias_pair(torch.stack([p[0] for p in self.draft_pairs], dim=1).flatten(0, 1))


class _BadWords:
    """The adjusted rows' bad words of several tokens, batched across rows by word length: per length n,
    the first n - 1 tokens [E, W, n - 1] and the last [E, W] of each row's words, padded with words that
    cannot match (a prefix token of -2; a context token is >= -1)."""

    def __init__(self, seqs: Seq[Sequence], draw_rows: list[int], to_device: ToDevice) -> None:
        words = [[w for w in seq.params.bad_words_token_ids or () if len(w) > 1] for seq in seqs]
        have = [a for a, ws in enumerate(words) if ws]
        self.rows: Optional[torch.Tensor] = to_device(torch.tensor(have, dtype=torch.int64)) if have else None
        if not have:
            return
        self.width = max(len(w) for a in have for w in words[a]) - 1
        tails = []
        for a in have:  # the output's last width tokens, -1 where it is shorter (a prefix must lie in the output)
            output = seqs[a].token_ids[seqs[a].num_prompt_tokens:][-self.width:]
            tails.append([-1] * (self.width - len(output)) + output)
        self.tails = to_device(torch.tensor(tails, dtype=torch.int64))
        self.draw_rows = to_device(torch.tensor([draw_rows[a] for a in have], dtype=torch.int64))
        self.groups = []
        for n in sorted({len(w) for a in have for w in words[a]}):
            of_n = [[w for w in words[a] if len(w) == n] for a in have]
            most = max(map(len, of_n))
            prefixes = [[w[:-1] for w in ws] + [[-2] * (n - 1)] * (most - len(ws)) for ws in of_n]
            lasts = [[w[-1] for w in ws] + [0] * (most - len(ws)) for ws in of_n]
            self.groups.append((n, to_device(torch.tensor(prefixes, dtype=torch.int64)),
                                to_device(torch.tensor(lasts, dtype=torch.int64))))

    def bans(self, first: int, count: int, drafts: torch.Tensor, vocab: int) -> torch.Tensor:
        """[E, count, V] bool: the last token of each bad word whose other tokens end the context of
        positions first .. first + count - 1 (the output's tail, then the drafts before the position)."""
        ctx = torch.cat([self.tails, drafts.index_select(0, self.draw_rows)], dim=1)  # position j ends at width + j
        hits = torch.zeros(ctx.shape[0], count, vocab, dtype=torch.float32, device=ctx.device)
        for n, prefixes, lasts in self.groups:
            start = self.width - (n - 1) + first
            windows = ctx.unfold(1, n - 1, 1)[:, start:start + count]  # [E, count, n - 1]
            match = (windows[:, :, None, :] == prefixes[:, None]).all(-1)  # [E, count, W]
            e = torch.arange(match.shape[0], device=ctx.device)[:, None, None].expand_as(match)
            k = torch.arange(count, device=ctx.device)[None, :, None].expand_as(match)
            hits.index_put_((e.reshape(-1), k.reshape(-1), lasts[:, None, :].expand_as(match).reshape(-1)),
                            match.reshape(-1).float(), accumulate=True)  # words may share a last token: count them
        return hits > 0
