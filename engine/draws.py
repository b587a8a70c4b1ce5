"""A step's draws and the rast_sample calls that make them.

A draw samples one token from one row of the step's logits: a decode or a prefill's last token draws once
from its row; a request's first draw of n > 1 samples draws n times from its one prefilled row, with a
seed per sample. Those n draws read the row through a stride-0 view (``expand``), never a copy per draw,
and their logprobs come from one rast_logprobs row: so the memory of a step is O(rows x V) whatever n is
(a copy per draw made it O(n x V): at n = 10,000 and V = 152064, 6 GB a model in fp32).

Calls: one rast_sample for the rows drawn once, gathered (none gathered when they are every row, as in a
decode step), and one per row drawn n > 1 times; the ids come back in draw order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection, Optional, Sequence as Seq

import torch

import rast_kernels
from rast_engine.logit_adjust import Adjust, adjustment
from rast_engine.pending import DrawLogprobs
from rast_engine.sampling_params import SamplingParams, sample_seed

if TYPE_CHECKING:
    from rast_engine.sequence import Sequence

ToDevice = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Draw:
    """One token to draw: from the logits of sequence ``row`` (n > 1 forks draw n times from one row)."""
    row: int
    params: SamplingParams
    weights: list[float]  # λ per pair
    seed: int
    offset: int  # tokens the sample has generated so far: draws of one sample never share noise
    adjust: Optional[Adjust] = None  # an adjusted draw's logit_bias / min_tokens / penalty inputs (logit_adjust.py)


def step_draws(seqs: Seq[Sequence], eos_token_ids: Collection[int]) -> tuple[list[Draw], list[tuple[Sequence, int]]]:
    """The draws of a step over ``seqs`` (row i is sequence i) and each sequence's number of them: a prefill
    chunk short of its sequence's end draws none, a request's first draw n (one per sample, from its one
    prefilled row), any other one."""
    draws: list[Draw] = []
    owners: list[tuple[Sequence, int]] = []
    for row, seq in enumerate(seqs):
        if seq.num_scheduled_tokens < seq.num_uncomputed:
            owners.append((seq, 0))
            continue
        g, before = seq.group, len(draws)
        if not g.forked:
            adjust = adjustment(seq, True, eos_token_ids)
            draws += [Draw(row, g.params, g.weights, sample_seed(g.request_seed, j), 0, adjust)
                      for j in range(g.params.n)]
        else:
            draws.append(Draw(row, g.params, g.weights, seq.seed, seq.num_generated,
                              adjustment(seq, False, eos_token_ids)))
        owners.append((seq, len(draws) - before))
    return draws, owners


def row_params(draws: Seq[Draw], to_device: ToDevice, greedy_as_t1: bool = False) -> dict[str, torch.Tensor]:
    """rast_sample's per-row filter parameters, one row per draw."""
    temps = [d.params.temperature for d in draws]
    if greedy_as_t1:
        temps = [t if t > 0 else 1.0 for t in temps]
    return dict(
        temperature=to_device(torch.tensor(temps, dtype=torch.float32)),
        top_k=to_device(torch.tensor([d.params.top_k for d in draws], dtype=torch.int32)),
        top_p=to_device(torch.tensor([d.params.top_p for d in draws], dtype=torch.float32)),
        min_p=to_device(torch.tensor([d.params.min_p for d in draws], dtype=torch.float32)),
    )


def _rows(logits: list[torch.Tensor], rows: list[int], to_device: ToDevice) -> list[torch.Tensor]:
    """The logits of ``rows`` (the tensors themselves when they are every row in order)."""
    if rows == list(range(logits[0].shape[0])):
        return logits
    index = to_device(torch.tensor(rows, dtype=torch.int64))
    return [t.index_select(0, index) for t in logits]


def _weights(draws: Seq[Draw], pairs: int) -> torch.Tensor:
    return torch.tensor([d.weights for d in draws], dtype=torch.float32).reshape(len(draws), pairs)


def sample_draws(logits: list[torch.Tensor], draws: Seq[Draw], to_device: ToDevice, vocab_size: int,
                 backend: Optional[str]) -> torch.Tensor:
    """int64 [len(draws)] on the device: each draw's token, in draw order (module docstring)."""
    pairs = (len(logits) - 1) // 2
    by_row: dict[int, list[int]] = {}  # row -> its draws' indices, rows in order of their first draw
    for j, d in enumerate(draws):
        by_row.setdefault(d.row, []).append(j)
    once = [idx[0] for idx in by_row.values() if len(idx) == 1]
    parts: list[tuple[list[int], list[torch.Tensor]]] = []  # (draw indices, their logits)
    if once:
        parts.append((once, _rows(logits, [draws[j].row for j in once], to_device)))
    for row, idx in by_row.items():
        if len(idx) > 1:
            parts.append((idx, [t[row:row + 1].expand(len(idx), -1) for t in logits]))
    outs = []
    for idx, rows in parts:
        sub = [draws[j] for j in idx]
        outs.append(rast_kernels.rast_sample(
            rows[0], list(zip(rows[1::2], rows[2::2])), weights=to_device(_weights(sub, pairs)),
            **row_params(sub, to_device),
            seed=to_device(torch.tensor([d.seed for d in sub], dtype=torch.int64)),
            offset=to_device(torch.tensor([d.offset for d in sub], dtype=torch.int64)),
            vocab_size=vocab_size, backend=backend))
    if len(parts) == 1 and parts[0][0] == list(range(len(draws))):
        return outs[0]
    order = to_device(torch.tensor([j for idx, _ in parts for j in idx], dtype=torch.int64))
    return torch.empty(len(draws), dtype=torch.int64, device=outs[0].device).index_copy_(0, order, torch.cat(outs))


def draw_logprobs(logits: list[torch.Tensor], draws: Seq[Draw], ids: torch.Tensor, to_device: ToDevice,
                  vocab_size: int, backend: Optional[str], raw: bool = False) -> Optional[DrawLogprobs]:
    """Logprobs under the filtered distribution each token was drawn from (greedy rows: T = 1), or with
    ``raw`` (logprobs_mode "raw_logprobs") of the combination alone at T = 1, for the draws that ask for
    them, computed on the device (None: no draw asks). Draws of one row share its distribution: one
    rast_logprobs row each row, whatever the draws."""
    want = [j for j, d in enumerate(draws) if d.params.logprobs is not None]
    if not want:
        return None
    rows: list[int] = []  # each wanted row once, in order; its first draw gives the parameters
    first: list[Draw] = []
    slot: dict[int, int] = {}
    for j in want:
        if draws[j].row not in slot:
            slot[draws[j].row] = len(rows)
            rows.append(draws[j].row)
            first.append(draws[j])
    sub = _rows(logits, rows, to_device)
    # raw: rast_logprobs' defaults, T = 1 and no filter
    params: dict[str, torch.Tensor | int] = {} if raw else dict(row_params(first, to_device, greedy_as_t1=True))
    if not raw and len({d.params.top_k for d in first}) == 1:  # one k (as a rule): a top-k of k values, not a sort
        params["top_k"] = first[0].params.top_k
    logp = rast_kernels.rast_logprobs(  # finite however small a token's probability (probs.log() underflowed)
        sub[0], list(zip(sub[1::2], sub[2::2])), weights=to_device(_weights(first, (len(logits) - 1) // 2)),
        **params, vocab_size=vocab_size, backend=backend)
    counts = [draws[j].params.logprobs for j in want]
    k = min(max(counts), logp.shape[1])
    top_val, top_ids = logp.topk(k, dim=1) if k > 0 else (logp[:, :0], logp[:, :0])
    at = to_device(torch.tensor([slot[draws[j].row] for j in want], dtype=torch.int64))
    if len(rows) != len(want):
        top_val, top_ids = top_val.index_select(0, at), top_ids.index_select(0, at)
    # an id of -1 (no admissible token) makes wait() raise; clamped, it never indexes out of bounds
    chosen_ids = ids.index_select(0, to_device(torch.tensor(want, dtype=torch.int64))).clamp(min=0)
    chosen = logp[at, chosen_ids]
    return DrawLogprobs(want, counts, chosen, top_val, top_ids.long())
