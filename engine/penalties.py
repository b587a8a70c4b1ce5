"""Presence, frequency and repetition penalties (vLLM's SamplingParams fields), applied to what RAST
samples from: the combined logits z = M + Σ_k λ_k (R_k − S_k), before temperature and the filters.

    z'  = z / r if z > 0 else z · r       for every token of the prompt or the output (r: repetition_penalty)
    z'' = z' − f · c − p · [c > 0]         c: the token's count in the output (f: frequency, p: presence)

How: the fused sampler sums the pairs it is given, so a penalty is one more pair (bias, 0) of weight 1
with bias = z'' − z at each penalized row's seen tokens and 0 elsewhere; the kernel then samples from
z + (z'' − z), which is z'' up to one float32 rounding. z is gathered at the seen tokens only, in the
kernels' order (pair by pair), so the device work beyond one [rows, V] float32 bias is O(seen tokens).

Invariants: a penalized draw needs every earlier token of its sequence on the host (its counts), so the
engine never launches a step ahead of a batch that holds one (LLMEngine._launch_ahead); penalized
batches decode eagerly rather than by the CUDA graphs, whose sampler reads a fixed set of pairs;
speculative decoding refuses penalized requests. A row without penalties in a penalized batch gets a
bias of 0, so its tokens are those of an unpenalized step. Host cost: O(new tokens) to keep a
sequence's counts, O(distinct seen tokens) a step to send them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Optional, Sequence as Seq

import torch

if TYPE_CHECKING:
    from rast_engine.draws import Draw
    from rast_engine.sequence import Sequence

ToDevice = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class History:
    """What a penalized draw is penalized for: its prompt's distinct ids and its output's counts."""
    prompt: list[int]
    counts: dict[int, int]


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


def history(seq: Sequence, first_draw: bool) -> Optional[History]:
    """The History of ``seq``'s next draw (None without penalties); a request's first draw has no output."""
    if not seq.params.penalized:
        return None
    group = seq.group
    if group.distinct_prompt is None:
        group.distinct_prompt = list(dict.fromkeys(group.prompt_token_ids))
    if first_draw:
        return History(group.distinct_prompt, {})
    if seq.output_counts is None:
        seq.output_counts = OutputCounts()
    return History(group.distinct_prompt, seq.output_counts.update(seq.token_ids, seq.num_prompt_tokens))


def with_penalties(logits: list[torch.Tensor], draws: Seq[Draw], to_device: ToDevice, vocab: int
                   ) -> tuple[list[torch.Tensor], Seq[Draw]]:
    """The sampler's inputs with the penalty pair appended (and weight 1 for it in every draw), or
    (logits, draws) unchanged when no draw is penalized. ``logits``: [M, R1, S1, ...], one row per draw row."""
    firsts: dict[int, Draw] = {}  # penalized logits row -> its first draw (draws of a row share params)
    for d in draws:
        if d.history is not None:
            firsts.setdefault(d.row, d)
    if not firsts:
        return logits, draws
    row_at, tokens, counts, params = [], [], [], []
    for i, (row, d) in enumerate(firsts.items()):
        h, p = d.history, d.params
        seen = list(dict.fromkeys(h.prompt + list(h.counts))) if p.repetition_penalty != 1 else list(h.counts)
        row_at += [i] * len(seen)
        tokens += seen
        counts += [h.counts.get(t, 0) for t in seen]
        params.append([p.repetition_penalty, p.frequency_penalty, p.presence_penalty])
    dev = logits[0].device
    at = to_device(torch.tensor(row_at, dtype=torch.int64))
    rows = to_device(torch.tensor(list(firsts), dtype=torch.int64)).index_select(0, at)
    tok = to_device(torch.tensor(tokens, dtype=torch.int64))
    weights = to_device(torch.tensor([d.weights for d in firsts.values()], dtype=torch.float32)
                        .reshape(len(firsts), -1)).index_select(0, at)
    z = logits[0][rows, tok].float()  # as the sampler combines: pair by pair, in float32
    for k in range(weights.shape[1]):
        z = z + weights[:, k] * (logits[1 + 2 * k][rows, tok].float() - logits[2 + 2 * k][rows, tok].float())
    rep, freq, pres = to_device(torch.tensor(params, dtype=torch.float32)).index_select(0, at).unbind(1)
    c = to_device(torch.tensor(counts, dtype=torch.float32))
    penalized = torch.where(z > 0, z / rep, z * rep) - freq * c - pres * (c > 0).float()
    bias = torch.zeros(logits[0].shape[0], vocab, dtype=torch.float32, device=dev)
    bias[rows, tok] = penalized - z
    zeros = torch.zeros(1, vocab, dtype=torch.float32, device=dev).expand(bias.shape[0], vocab)
    return logits + [bias, zeros], [replace(d, weights=list(d.weights) + [1.0]) for d in draws]
