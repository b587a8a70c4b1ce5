"""Per-request adjustments of what RAST samples from, the combined logits z = M + Σ_k λ_k (R_k − S_k),
before temperature and the filters, in vLLM's order (its logits processors, then its penalties):

    1. logit_bias:   z + b_t at each biased token t (OpenAI's logit_bias)
    2. min_tokens:   −inf at the EOS and stop_token_ids while the output is shorter than min_tokens
    3. penalties:    z / r if z > 0 else z · r at every token of the prompt or the output (repetition_penalty r),
                     then z − f · c − p · [c > 0] (c: the token's count in the output; frequency f, presence p)

How: the fused sampler sums the pairs it is given, so an adjustment is one more pair (bias, 0) of weight 1
with bias = z' − z at each adjusted row's touched tokens and 0 elsewhere; the kernel then samples from
z + (z' − z), which is z' up to one float32 rounding, and a −inf bias excludes its token exactly (the
kernels exclude any token with an infinite input). z is gathered at the touched tokens only, in the
kernels' order (pair by pair), so the device work beyond one [rows, V] float32 bias is O(touched tokens).

Invariants: a penalized draw needs every earlier token of its sequence on the host (its counts), so the
engine never launches a step ahead of a batch that holds one (LLMEngine._launch_ahead); logit_bias and
min_tokens need only the number of tokens so far, which the host always knows, so those steps may be
launched ahead. Adjusted batches decode eagerly rather than by the CUDA graphs, whose sampler reads a
fixed set of pairs; speculative decoding refuses adjusted requests. A row without adjustments in an
adjusted batch gets a bias of 0, so its tokens are those of an unadjusted step. Host cost: O(new tokens)
to keep a sequence's counts, O(touched tokens) a step to send them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Collection, Optional, Sequence as Seq

import torch

if TYPE_CHECKING:
    from rast_engine.draws import Draw
    from rast_engine.sequence import Sequence

ToDevice = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Adjust:
    """What a draw's adjustment depends on beyond its params (empty where the params do not ask for it)."""
    prompt: list[int]  # the prompt's distinct ids (repetition penalty)
    counts: dict[int, int]  # the output's token counts (penalties)
    banned: list[int]  # ids masked at this draw (min_tokens not reached)


class OutputCounts:
    """A sequence's generated-token counts, updated with just the tokens added since the last call."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.upto = 0  # index into token_ids up to which tokens are counted

    def update(self, token_ids: list[int], start: int) -> dict[int, int]:
        if self.upto < start or self.upto > len(token_ids):  # first call, or tokens were dropped: recount
            self.counts, self.upto = {}, start
        for i in range(self.upto, len(token_ids)):
            self.counts[token_ids[i]] = self.counts.get(token_ids[i], 0) + 1
        self.upto = len(token_ids)
        return self.counts


def adjustment(seq: Sequence, first_draw: bool, eos_token_ids: Collection[int]) -> Optional[Adjust]:
    """The Adjust of ``seq``'s next draw (None without adjustments); a request's first draw has no output."""
    p = seq.params
    if not p.adjusts_logits:
        return None
    generated = 0 if first_draw else seq.num_generated
    banned = []
    if generated < p.min_tokens:
        banned = list(dict.fromkeys(p.stop_token_ids + ([] if p.ignore_eos else sorted(eos_token_ids))))
    prompt: list[int] = []
    counts: dict[int, int] = {}
    if p.repetition_penalty != 1:
        group = seq.group
        if group.distinct_prompt is None:
            group.distinct_prompt = list(dict.fromkeys(group.prompt_token_ids))
        prompt = group.distinct_prompt
    if p.penalized and not first_draw:
        if seq.output_counts is None:
            seq.output_counts = OutputCounts()
        counts = seq.output_counts.update(seq.token_ids, seq.num_prompt_tokens)
    return Adjust(prompt, counts, banned)


def _touched(d: Draw, vocab: int) -> tuple[list[int], list[list[float]]]:
    """A draw's touched ids below ``vocab`` and, for each, [bias, banned, repetition, frequency·c, presence·[c>0]]."""
    a, p = d.adjust, d.params
    bias = p.logit_bias or {}
    banned, seen = set(a.banned), set(a.prompt)
    ids = [t for t in dict.fromkeys(list(bias) + a.banned + a.prompt + list(a.counts)) if t < vocab]
    rows = []
    for t in ids:
        c = a.counts.get(t, 0)
        rep = p.repetition_penalty if c or t in seen else 1.0
        rows.append([bias.get(t, 0.0), float(t in banned), rep, p.frequency_penalty * c, p.presence_penalty * (c > 0)])
    return ids, rows


def with_adjustments(logits: list[torch.Tensor], draws: Seq[Draw], to_device: ToDevice, vocab: int
                     ) -> tuple[list[torch.Tensor], Seq[Draw]]:
    """The sampler's inputs with the adjustment pair appended (and weight 1 for it in every draw), or
    (logits, draws) unchanged when no draw is adjusted. ``logits``: [M, R1, S1, ...], one row per draw row."""
    firsts: dict[int, Draw] = {}  # adjusted logits row -> its first draw (draws of a row share params)
    for d in draws:
        if d.adjust is not None:
            firsts.setdefault(d.row, d)
    if not firsts:
        return logits, draws
    row_at, tokens, terms = [], [], []
    for i, d in enumerate(firsts.values()):
        ids, rows = _touched(d, vocab)
        row_at += [i] * len(ids)
        tokens += ids
        terms += rows
    dev = logits[0].device
    bias = torch.zeros(logits[0].shape[0], vocab, dtype=torch.float32, device=dev)
    if tokens:
        at = to_device(torch.tensor(row_at, dtype=torch.int64))
        rows_t = to_device(torch.tensor(list(firsts), dtype=torch.int64)).index_select(0, at)
        tok = to_device(torch.tensor(tokens, dtype=torch.int64))
        weights = to_device(torch.tensor([d.weights for d in firsts.values()], dtype=torch.float32)
                            .reshape(len(firsts), -1)).index_select(0, at)
        z = logits[0][rows_t, tok].float()  # as the sampler combines: pair by pair, in float32
        for k in range(weights.shape[1]):
            z = z + weights[:, k] * (logits[1 + 2 * k][rows_t, tok].float() - logits[2 + 2 * k][rows_t, tok].float())
        add, ban, rep, freq, pres = to_device(torch.tensor(terms, dtype=torch.float32)).unbind(1)
        z1 = torch.where(ban > 0, torch.full_like(z, float("-inf")), z + add)
        bias[rows_t, tok] = torch.where(z1 > 0, z1 / rep, z1 * rep) - freq - pres - z
    zeros = torch.zeros(1, vocab, dtype=torch.float32, device=dev).expand(bias.shape[0], vocab)
    return logits + [bias, zeros], [replace(d, weights=list(d.weights) + [1.0]) for d in draws]
