"""Per-request adjustments of what RAST samples from, the combined logits z = M + Σ_k λ_k (R_k − S_k),
before temperature and the filters, in vLLM's order (its masks and logits processors, then its penalties):

    0. masks:        −inf at every token outside allowed_token_ids, at every token the structured output's
                     grammar refuses next (structured.py), at the last token of each bad word whose
                     other tokens end the output (a one-token bad word: at every draw), and at every
                     token the large model alone finds implausible (plausibility_alpha: plausibility.py)
    1. logit_bias:   z + b_t at each biased token t (OpenAI's logit_bias)
    2. min_tokens:   −inf at the EOS and stop_token_ids while the output is shorter than min_tokens
    3. processors:   each of the request's logits_processors in turn, z' = fn(..., z) (logits_processors.py)
    4. penalties:    z / r if z > 0 else z · r at every token of the prompt or the output (repetition_penalty r),
                     then z − f · c − p · [c > 0] (c: the token's count in the output; frequency f, presence p)

How: the fused sampler sums the pairs it is given, so an adjustment is one more pair (bias, 0) of weight 1
with bias = z' − z where the adjustment changed z and 0 elsewhere; the kernel then samples from
z + (z' − z), which is z' up to one float32 rounding at the changed tokens and exactly z at the others,
and a −inf bias excludes its token exactly (the kernels exclude any token with an infinite input). z is
recombined densely for the adjusted rows only, by the sampler spec's own combine (rast_kernels/reference.py).

Cost: the host work a step is O(adjusted rows + tokens added since the last step + bad words' tokens)
plus structured outputs' bitmasks: a request's prompt ids, allowed_token_ids and logit_bias go to the
device once (RequestTensors), and a penalized sequence keeps its output counts as a [V] float32 device
tensor (OutputCounts, V·4 bytes a sequence) updated with its new tokens only. The device work is a few
passes over [adjusted rows, V].

Invariants: a step launched ahead (async scheduling) draws after one pending token a sequence, whose id
is on the device only: the step's own input there. A penalized draw counts it on the device (its
counts are the known tokens' plus one at that input), and a bad word of several tokens whose earlier
tokens end the known output bans its last token where that input is the word's second-to-last (a
device-side condition, Adjust.pending_bans); the other adjustments need only the number of tokens so
far. Only structured outputs read every token on the host (the grammar matcher), so the engine never
launches a step ahead of a batch holding one (SamplingParams.reads_output, LLMEngine._launch_ahead).
An adjusted batch replays only the forward's CUDA graph (cuda_graph.py) and adjusts and samples eagerly:
the sampler's graph reads a fixed set of pairs. Speculative rounds adjust each position as if the drafts
before it were accepted (speculative/adjust.py; structured outputs by speculative/grammar.py). A row
without adjustments in an adjusted batch gets a bias of 0, so its tokens are those of an unadjusted step.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Collection, Optional, Sequence as Seq

import torch

from rast_kernels.batch import normalize
from rast_kernels.reference import combine

from rast_engine.bad_words import bad_word_bans
from rast_engine.logits_processors import process_rows
from rast_engine.plausibility import mask_implausible
from rast_engine.structured import draw_bitmasks, unpack

if TYPE_CHECKING:
    from rast_engine.draws import Draw
    from rast_engine.sampling_params import SamplingParams
    from rast_engine.sequence import Sequence, SequenceGroup

ToDevice = Callable[[torch.Tensor], torch.Tensor]


class RequestTensors:
    """A request's prompt ids and logit_bias on the device, sent once: every adjusted step reads them."""

    def __init__(self, group: SequenceGroup) -> None:
        self.group = group
        self._prompt: Optional[torch.Tensor] = None
        self._bias: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._allowed: Optional[torch.Tensor] = None

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

    def allowed(self, to_device: ToDevice) -> Optional[torch.Tensor]:
        """allowed_token_ids (below the vocabulary: requests.checked_request), None if every id is."""
        ids = self.group.params.allowed_token_ids
        if ids is not None and self._allowed is None:
            self._allowed = to_device(torch.tensor(ids, dtype=torch.int64))
        return self._allowed


class OutputCounts:
    """A sequence's output-token counts as a [V] float32 device tensor, updated with just the tokens added
    since the last call. Only known tokens are counted (a pending one is added to a copy, draw_counts),
    so counts only grow; if tokens were dropped since, they are counted again from the start."""

    def __init__(self) -> None:
        self.counts: Optional[torch.Tensor] = None
        self.upto = 0  # index into token_ids up to which tokens are counted

    def tensor(self, token_ids: list[int], start: int, end: int, vocab: int, to_device: ToDevice) -> torch.Tensor:
        """The counts of token_ids[start:end]."""
        if self.counts is None or self.upto < start or self.upto > end:
            self.counts, self.upto = to_device(torch.zeros(vocab, dtype=torch.float32)), start
        if self.upto < end:
            new = to_device(torch.tensor(token_ids[self.upto:end], dtype=torch.int64))
            self.counts.index_add_(0, new, torch.ones_like(new, dtype=torch.float32))
            self.upto = end
        return self.counts


@dataclass
class Adjust:
    """What a draw's adjustment reads beyond its params."""
    request: RequestTensors
    banned: list[int]  # ids masked at this draw (min_tokens not reached)
    seq: Optional[Sequence]  # whose output counts penalize this draw (None: penalties off, or no output yet)
    # (the sequence, whether it is its request's first draw) where a structured output masks the draw; its
    # bitmask is computed when with_adjustments runs: after the step's forwards are enqueued, so on CUDA the
    # grammar matcher's host work overlaps them
    grammar: Optional[tuple[Sequence, bool]] = None
    # the ids min_tokens masks while the output is short (a speculative round decides it per position)
    min_tokens_ids: list[int] = field(default_factory=list)
    # the sequence's last token is pending (a step launched ahead): its id is the step's input there
    pending: bool = False
    # (t, b): b is masked iff the pending last token is t (bad words of several tokens, bad_words.py)
    pending_bans: list[tuple[int, int]] = field(default_factory=list)
    # (prompt ids, output ids so far) for logits_processors (logits_processors.py); None without them
    token_ids: Optional[tuple[list[int], list[int]]] = None


def min_tokens_bans(params: SamplingParams, eos_token_ids: Collection[int]) -> list[int]:
    """The ids min_tokens masks while the output is shorter: the stop ids and EOS, with ignore_eos too (as
    vLLM's MinTokens processor and HF's MinNewTokensLength mask EOS whatever ends a request)."""
    return params.stop_token_ids + sorted(eos_token_ids)


def adjustment(seq: Sequence, first_draw: bool, eos_token_ids: Collection[int]) -> Optional[Adjust]:
    """The Adjust of ``seq``'s next draw (None without adjustments); a request's first draw has no output."""
    p = seq.params
    if not p.adjusts_logits:
        return None
    generated = 0 if first_draw else seq.num_generated
    if seq.num_pending > 1:  # a launched step follows the one step in flight
        raise RuntimeError(f"sequence {seq.seq_id}: a draw after {seq.num_pending} pending tokens")
    banned, pending_bans = bad_word_bans(seq, generated) if p.bad_words_token_ids else ([], [])
    stops = min_tokens_bans(p, eos_token_ids) if p.min_tokens else []
    if generated < p.min_tokens:
        banned += stops
    banned = list(dict.fromkeys(banned))
    group = seq.group
    if group.adjust_tensors is None:
        group.adjust_tensors = RequestTensors(group)
    if p.penalized and not first_draw and seq.output_counts is None:
        seq.output_counts = OutputCounts()
    token_ids = None
    if p.processors is not None:  # never after a pending token: SamplingParams.reads_output
        start = seq.num_prompt_tokens
        token_ids = (seq.token_ids[:start], seq.token_ids[start:start + generated])
    return Adjust(group.adjust_tensors, banned, seq if p.penalized and not first_draw else None,
                  (seq, first_draw) if group.grammar is not None else None, stops,
                  pending=bool(seq.num_pending) and not first_draw, pending_bans=pending_bans, token_ids=token_ids)


def _rows_of(sizes: list[int], to_device: ToDevice) -> torch.Tensor:
    """Row i repeated sizes[i] times, on the device."""
    return to_device(torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.int64)))


def keep_only(z: torch.Tensor, rows: list[int], keep: torch.Tensor, to_device: ToDevice) -> None:
    """−inf in z's ``rows`` wherever ``keep`` [len(rows), V] is False, in place."""
    at = to_device(torch.tensor(rows, dtype=torch.int64))
    z.index_copy_(0, at, z.index_select(0, at).masked_fill(~keep, float("-inf")))


def combined(logits: list[torch.Tensor], weights: torch.Tensor, vocab: int) -> torch.Tensor:
    """z [rows, vocab] float32 from the engine's logits [M, R1, S1, ...] and λ [rows, pairs], by the sampler
    spec's own combine (rast_kernels/reference.py), so it rounds as the kernels do."""
    return combine(normalize(logits[0], list(zip(logits[1::2], logits[2::2])), weights=weights, vocab_size=vocab))


def bias_and_ban(z: torch.Tensor, adjusts: list[Adjust], vocab: int, to_device: ToDevice,
                 last: Optional[torch.Tensor] = None) -> None:
    """Steps 0 to 2 on z [rows, V], in place (bans: step 0's bad words and step 2's, which commute);
    ``last`` [rows]: each row's input token, the pending one that Adjust.pending_bans test."""
    allowed = [(j, ids) for j, ids in enumerate(a.request.allowed(to_device) for a in adjusts) if ids is not None]
    if allowed:
        keep = torch.zeros(len(allowed), vocab, dtype=torch.bool, device=z.device)
        keep.index_put_((_rows_of([len(ids) for _, ids in allowed], to_device), torch.cat([ids for _, ids in allowed])),
                        torch.ones((), dtype=torch.bool, device=z.device))
        keep_only(z, [j for j, _ in allowed], keep, to_device)
    grammar = [(j, a.grammar) for j, a in enumerate(adjusts) if a.grammar is not None]
    if grammar:
        keep_only(z, [j for j, _ in grammar], unpack(to_device(draw_bitmasks([g for _, g in grammar])), vocab),
                  to_device)
    biases = [a.request.bias(to_device) for a in adjusts]
    sizes = [len(ids) for ids, _ in biases]
    if any(sizes):
        z.index_put_((_rows_of(sizes, to_device), torch.cat([ids for ids, _ in biases])),
                     torch.cat([b for _, b in biases]), accumulate=True)
    banned = [[t for t in a.banned if t < vocab] for a in adjusts]
    sizes = [len(b) for b in banned]
    if any(sizes):
        ids = to_device(torch.tensor([t for b in banned for t in b], dtype=torch.int64))
        z.index_put_((_rows_of(sizes, to_device), ids), torch.full((), float("-inf"), device=z.device))
    sizes = [len(a.pending_bans) for a in adjusts]
    if any(sizes):
        rows = _rows_of(sizes, to_device)
        after, ids = to_device(torch.tensor([tb for a in adjusts for tb in a.pending_bans], dtype=torch.int64)).unbind(1)
        hit = last.index_select(0, rows) == after  # -inf where the pending token makes the word, 0 elsewhere
        z.index_put_((rows, ids), torch.where(hit, float("-inf"), 0.0), accumulate=True)


def draw_counts(ds: Seq[Draw], vocab: int, to_device: ToDevice, last: Optional[torch.Tensor] = None
                ) -> list[Optional[torch.Tensor]]:
    """Each draw's output counts [V] (None: not penalized, or a first draw with no output yet); a draw
    after a pending token counts it too, from ``last`` [len(ds)] (each draw's input token), on a copy."""
    out: list[Optional[torch.Tensor]] = []
    for d in ds:
        seq = d.adjust.seq if d.params.penalized else None
        out.append(None if seq is None else seq.output_counts.tensor(seq.token_ids, seq.num_prompt_tokens,
                                                                     seq.num_known, vocab, to_device))
    pending = [j for j, (d, c) in enumerate(zip(ds, out)) if c is not None and d.adjust.pending]
    if pending:
        at = to_device(torch.tensor(pending, dtype=torch.int64))
        c = torch.stack([out[j] for j in pending])
        c.index_put_((torch.arange(len(pending), device=c.device), last.index_select(0, at)),
                     torch.ones((), dtype=c.dtype, device=c.device), accumulate=True)
        for j, row in zip(pending, c.unbind(0)):
            out[j] = row
    return out


def penalize(z: torch.Tensor, params: Seq[SamplingParams], requests: Seq[RequestTensors],
             counts: Seq[Optional[torch.Tensor]], vocab: int, to_device: ToDevice) -> None:
    """Step 4 on the penalized rows of z [rows, V], in place; row i's output counts are counts[i] (None:
    no output yet)."""
    at = [i for i, p in enumerate(params) if p.penalized]
    if not at:
        return
    zero = to_device(torch.zeros(vocab, dtype=torch.float32)) if any(counts[i] is None for i in at) else None
    c = torch.stack([zero if counts[i] is None else counts[i] for i in at])  # [P, V]
    in_output = c > 0
    seen = in_output.clone()
    rep_at = [j for j, i in enumerate(at) if params[i].repetition_penalty != 1]
    if rep_at:
        prompts = [requests[at[j]].prompt(vocab, to_device) for j in rep_at]
        rows = to_device(torch.tensor(rep_at, dtype=torch.int64)).index_select(0, _rows_of([len(p) for p in prompts],
                                                                                            to_device))
        seen.index_put_((rows, torch.cat(prompts)), torch.ones((), dtype=torch.bool, device=seen.device))
    rep, freq, pres = to_device(torch.tensor(
        [[params[i].repetition_penalty, params[i].frequency_penalty, params[i].presence_penalty]
         for i in at], dtype=torch.float32)).unsqueeze(2).unbind(1)
    at_t = to_device(torch.tensor(at, dtype=torch.int64))
    zp = z.index_select(0, at_t)
    zp = torch.where(seen, torch.where(zp > 0, zp / rep, zp * rep), zp) - freq * c - pres * in_output.float()
    z.index_copy_(0, at_t, zp)


def bias_pair(bias: torch.Tensor) -> list[torch.Tensor]:
    """The sampler pair (bias, 0) that adds ``bias`` [rows, V] to z at weight 1 (the 0 a stride-0 view)."""
    return [bias, torch.zeros(1, bias.shape[1], dtype=torch.float32, device=bias.device).expand(bias.shape[0], -1)]


def adjustment_pair(z: torch.Tensor, adjusted: torch.Tensor, rows: torch.Tensor, num_rows: int) -> list[torch.Tensor]:
    """The pair (bias, 0) whose weight-1 term turns the sampler's z into ``adjusted`` at ``rows``: bias is
    adjusted − z where they differ (so an unchanged token's z stays exact) and 0 in every other row."""
    bias = torch.zeros(num_rows, z.shape[1], dtype=torch.float32, device=z.device)
    bias.index_copy_(0, rows, torch.where(adjusted != z, adjusted - z, torch.zeros_like(z)))
    return bias_pair(bias)


def with_adjustments(logits: list[torch.Tensor], draws: Seq[Draw], to_device: ToDevice, vocab: int,
                     inputs: Optional[torch.Tensor] = None) -> tuple[list[torch.Tensor], Seq[Draw]]:
    """The sampler's inputs with the adjustment pair appended (and weight 1 for it in every draw), or
    (logits, draws) unchanged when no draw is adjusted. ``logits``: [M, R1, S1, ...], one row per draw row;
    ``inputs``: each row's input token, needed where a draw follows a pending token (Adjust.pending)."""
    firsts: dict[int, Draw] = {}  # adjusted logits row -> its first draw (draws of a row share params)
    for d in draws:
        if d.adjust is not None:
            firsts.setdefault(d.row, d)
    if not firsts:
        return logits, draws
    ds = list(firsts.values())
    rows = to_device(torch.tensor(list(firsts), dtype=torch.int64))
    weights = to_device(torch.tensor([d.weights for d in ds], dtype=torch.float32).reshape(len(ds), -1))
    picked = [t.index_select(0, rows) for t in logits]  # the adjusted rows of every model's logits
    z = combined(picked, weights, vocab)
    last = None
    if any(d.adjust.pending for d in ds):
        if inputs is None:
            raise RuntimeError("a draw after a pending token needs the step's input ids")
        last = inputs.index_select(0, rows)
    adjusted = z.clone()
    bias_and_ban(adjusted, [d.adjust for d in ds], vocab, to_device, last)
    mask_implausible(adjusted, picked[0], [d.params for d in ds], vocab, to_device)
    process_rows(adjusted, ds, picked, vocab)
    penalize(adjusted, [d.params for d in ds], [d.adjust.request for d in ds], draw_counts(ds, vocab, to_device, last),
             vocab, to_device)
    return (logits + adjustment_pair(z, adjusted, rows, logits[0].shape[0]),
            [replace(d, weights=list(d.weights) + [1.0]) for d in draws])
