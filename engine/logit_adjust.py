"""Per-request adjustments of what RAST samples from, the combined logits z = M + Σ_k λ_k (R_k − S_k),
before temperature and the filters, in vLLM's order (its logits processors, then its penalties):

    1. logit_bias:   z + b_t at each biased token t (OpenAI's logit_bias)
    2. min_tokens:   −inf at the EOS and stop_token_ids while the output is shorter than min_tokens
    3. penalties:    z / r if z > 0 else z · r at every token of the prompt or the output (repetition_penalty r),
                     then z − f · c − p · [c > 0] (c: the token's count in the output; frequency f, presence p)

How: the fused sampler sums the pairs it is given, so an adjustment is one more pair (bias, 0) of weight 1
with bias = z' − z where the adjustment changed z and 0 elsewhere; the kernel then samples from
z + (z' − z), which is z' up to one float32 rounding at the changed tokens and exactly z at the others,
and a −inf bias excludes its token exactly (the kernels exclude any token with an infinite input). z is
recombined densely for the adjusted rows only, by the sampler spec's own combine (rast_kernels/reference.py).

Cost: the host work a step is O(adjusted rows + tokens added since the last step): a request's prompt
ids and logit_bias go to the device once (RequestTensors), and a penalized sequence keeps its output
counts as a [V] float32 device tensor (OutputCounts, V·4 bytes a sequence) updated with its new tokens
only. The device work is a few passes over [adjusted rows, V].

Invariants: a penalized draw needs every earlier token of its sequence on the host (its counts), so the
engine never launches a step ahead of a batch that holds one (LLMEngine._launch_ahead); logit_bias and
min_tokens need only the number of tokens so far, which the host always knows, so those steps may be
launched ahead. Adjusted batches decode eagerly rather than by the CUDA graphs, whose sampler reads a
fixed set of pairs; speculative decoding refuses adjusted requests. A row without adjustments in an
adjusted batch gets a bias of 0, so its tokens are those of an unadjusted step.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Collection, Optional, Sequence as Seq

import torch

from rast_kernels.batch import normalize
from rast_kernels.reference import combine

if TYPE_CHECKING:
    from rast_engine.draws import Draw
    from rast_engine.sequence import Sequence, SequenceGroup

ToDevice = Callable[[torch.Tensor], torch.Tensor]


class RequestTensors:
    """A request's prompt ids and logit_bias on the device, sent once: every adjusted step reads them."""

    def __init__(self, group: SequenceGroup) -> None:
        self.group = group
        self._prompt: Optional[torch.Tensor] = None
        self._bias: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def prompt(self, vocab: int, to_device: ToDevice) -> torch.Tensor:
        """The prompt's ids below ``vocab`` (repeats kept: marking a token twice marks it once)."""
        if self._prompt is None:
            self._prompt = to_device(torch.tensor([t for t in self.group.prompt_token_ids if t < vocab],
                                                  dtype=torch.int64))
        return self._prompt

    def bias(self, to_device: ToDevice) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, biases) of logit_bias; its ids are below the vocabulary (requests.checked_request)."""
        if self._bias is None:
            items = self.group.params.logit_bias or {}
            self._bias = (to_device(torch.tensor(list(items), dtype=torch.int64)),
                          to_device(torch.tensor(list(items.values()), dtype=torch.float32)))
        return self._bias


class OutputCounts:
    """A sequence's output-token counts as a [V] float32 device tensor, updated with just the tokens added
    since the last call. Only known tokens are counted (penalized steps are never launched ahead), so
    counts only grow; if tokens were dropped since, they are counted again from the start."""

    def __init__(self) -> None:
        self.counts: Optional[torch.Tensor] = None
        self.upto = 0  # index into token_ids up to which tokens are counted

    def tensor(self, token_ids: list[int], start: int, vocab: int, to_device: ToDevice) -> torch.Tensor:
        if self.counts is None or self.upto < start or self.upto > len(token_ids):
            self.counts, self.upto = to_device(torch.zeros(vocab, dtype=torch.float32)), start
        if self.upto < len(token_ids):
            new = to_device(torch.tensor(token_ids[self.upto:], dtype=torch.int64))
            self.counts.index_add_(0, new, torch.ones_like(new, dtype=torch.float32))
            self.upto = len(token_ids)
        return self.counts


@dataclass
class Adjust:
    """What a draw's adjustment reads beyond its params."""
    request: RequestTensors
    banned: list[int]  # ids masked at this draw (min_tokens not reached)
    seq: Optional[Sequence]  # whose output counts penalize this draw (None: penalties off, or no output yet)


def adjustment(seq: Sequence, first_draw: bool, eos_token_ids: Collection[int]) -> Optional[Adjust]:
    """The Adjust of ``seq``'s next draw (None without adjustments); a request's first draw has no output."""
    p = seq.params
    if not p.adjusts_logits:
        return None
    generated = 0 if first_draw else seq.num_generated
    banned = []
    if generated < p.min_tokens:
        banned = list(dict.fromkeys(p.stop_token_ids + ([] if p.ignore_eos else sorted(eos_token_ids))))
    group = seq.group
    if group.adjust_tensors is None:
        group.adjust_tensors = RequestTensors(group)
    if p.penalized and not first_draw and seq.output_counts is None:
        seq.output_counts = OutputCounts()
    return Adjust(group.adjust_tensors, banned, seq if p.penalized and not first_draw else None)


def _rows_of(sizes: list[int], to_device: ToDevice) -> torch.Tensor:
    """Row i repeated sizes[i] times, on the device."""
    return to_device(torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.int64)))


def _bias_and_ban(z: torch.Tensor, adjusts: list[Adjust], vocab: int, to_device: ToDevice) -> None:
    """Steps 1 and 2 on z [rows, V], in place."""
    biases = [a.request.bias(to_device) for a in adjusts]
    sizes = [len(ids) for ids, _ in biases]
    if any(sizes):
        z.index_put_((_rows_of(sizes, to_device), torch.cat([ids for ids, _ in biases])),
                     torch.cat([b for _, b in biases]), accumulate=True)
    banned = [[t for t in a.banned if t < vocab] for a in adjusts]
    sizes = [len(b) for b in banned]
    if any(sizes):
        ids = to_device(torch.tensor([t for b in banned for t in b], dtype=torch.int64))
        z.index_put_((_rows_of(sizes, to_device), ids), torch.tensor(float("-inf"), device=z.device))


def _penalize(z: torch.Tensor, ds: list[Draw], vocab: int, to_device: ToDevice) -> None:
    """Step 3 on the penalized rows of z [rows, V], in place."""
    at = [i for i, d in enumerate(ds) if d.params.penalized]
    if not at:
        return
    zero = None
    counts = []
    for i in at:
        seq = ds[i].adjust.seq
        if seq is None:  # a first draw: no output yet
            zero = to_device(torch.zeros(vocab, dtype=torch.float32)) if zero is None else zero
            counts.append(zero)
        else:
            counts.append(seq.output_counts.tensor(seq.token_ids, seq.num_prompt_tokens, vocab, to_device))
    c = torch.stack(counts)  # [P, V]
    in_output = c > 0
    seen = in_output.clone()
    rep_at = [j for j, i in enumerate(at) if ds[i].params.repetition_penalty != 1]
    if rep_at:
        prompts = [ds[at[j]].adjust.request.prompt(vocab, to_device) for j in rep_at]
        rows = to_device(torch.tensor(rep_at, dtype=torch.int64)).index_select(0, _rows_of([len(p) for p in prompts],
                                                                                            to_device))
        seen.index_put_((rows, torch.cat(prompts)), torch.tensor(True, device=seen.device))
    rep, freq, pres = to_device(torch.tensor(
        [[ds[i].params.repetition_penalty, ds[i].params.frequency_penalty, ds[i].params.presence_penalty]
         for i in at], dtype=torch.float32)).unsqueeze(2).unbind(1)
    at_t = to_device(torch.tensor(at, dtype=torch.int64))
    zp = z.index_select(0, at_t)
    zp = torch.where(seen, torch.where(zp > 0, zp / rep, zp * rep), zp) - freq * c - pres * in_output.float()
    z.index_copy_(0, at_t, zp)


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
    ds = list(firsts.values())
    rows = to_device(torch.tensor(list(firsts), dtype=torch.int64))
    weights = to_device(torch.tensor([d.weights for d in ds], dtype=torch.float32).reshape(len(ds), -1))
    picked = [t.index_select(0, rows) for t in logits]
    z = combine(normalize(picked[0], list(zip(picked[1::2], picked[2::2])), weights=weights, vocab_size=vocab))
    adjusted = z.clone()
    _bias_and_ban(adjusted, [d.adjust for d in ds], vocab, to_device)
    _penalize(adjusted, ds, vocab, to_device)
    bias = torch.zeros(logits[0].shape[0], vocab, dtype=torch.float32, device=logits[0].device)
    bias.index_copy_(0, rows, torch.where(adjusted != z, adjusted - z, torch.zeros_like(z)))
    zeros = torch.zeros(1, vocab, dtype=torch.float32, device=bias.device).expand(bias.shape[0], vocab)
    return logits + [bias, zeros], [replace(d, weights=list(d.weights) + [1.0]) for d in draws]
