"""The executable spec of RAST sampling (backend "torch"). Clear rather than fast: it sorts.

Every backend computes the same per-token quantities, in float32, with the same formulas:

    z_i   = logits_i + sum_k w_k * (rl_k,i - base_k,i)     (k in order; ids >= V dropped)
    F     = {i : z_i finite}                                 (a NaN/inf in any input makes z_i non-finite;
                                                              a NaN temperature, top_p or min_p empties F)
    zmax  = max_{i in F} z_i
    d_i   = (zmax - z_i) / T   >= 0                          ("distance" from the mode, in nats)
    w_i   = exp(-d_i)          in [0, 1]                     (unnormalised probability; w = 1 at the mode)

Working with d = (zmax - z)/T instead of z/T keeps tiny temperatures finite (d may overflow to +inf,
giving w = 0, but never NaN) and makes every threshold a threshold on one non-negative float. The
admissible set A (HF order: top-k, then top-p on the top-k survivors, then min-p) is

    top-k : d_i <= the k-th smallest d over F        (k <= 0 or k >= V: off; ties at the k-th kept)
    top-p : sum_{j in K, d_j < d_i} w_j < top_p * sum_{j in K} w_j     (K = top-k survivors; top_p = 1: off)
    min-p : w_i >= min_p                               (w_max = 1, so this is p_i >= min_p * p_max)

A is never empty when F is not (the mode survives every filter). Each filter keeps an upper set of
probability, so A = {i in F : d_i <= tau} for one threshold tau, which is what the fused kernel
searches for. Sums here are taken in float64 (the spec's sums are exact real sums); other backends
may sum in another order, so a token sitting exactly on a top-p boundary can differ by rounding.

    probs:  p_i = w_i / sum_{j in A} w_j on A, 0 elsewhere.   Greedy rows (T <= 0): one-hot on the mode.
    sample: argmax_{i in A} (gumbel(row_key(seed, offset), i) - d_i), lowest index on ties.
            Greedy rows: argmax_{i in F} z_i, lowest index on ties. Rows with F empty: -1.

Gumbel-max is an exact draw: argmax_i (g_i + log w_i) with i.i.d. standard Gumbel g_i is distributed
as w_i / sum w, and -d_i = log w_i (up to the common shift zmax/T, which does not change the argmax).
"""
from __future__ import annotations

import torch

from rast_kernels.batch import SamplingBatch
from rast_kernels.rng import row_key, token_gumbel


def combine(batch: SamplingBatch) -> torch.Tensor:
    """z [B, V] float32: the large model's logits plus the weighted deltas, accumulated pair by pair."""
    v = batch.vocab
    z = batch.logits[:, :v].float()
    for k, (rl, base) in enumerate(zip(batch.rl, batch.base)):
        z = z + batch.weights[:, k:k + 1] * (rl[:, :v].float() - base[:, :v].float())
    return z


def distances(batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, finite mask, d) with d = (zmax - z) / T on finite tokens and +inf elsewhere.

    Greedy rows (T <= 0) get d computed with T = 1; callers treat them separately."""
    z = combine(batch)
    nan_param = batch.temperature.isnan() | batch.top_p.isnan() | batch.min_p.isnan()
    finite = torch.isfinite(z) & ~nan_param[:, None]  # a row with a NaN parameter admits nothing
    zmax = torch.where(finite, z, float("-inf")).amax(dim=1, keepdim=True)
    temp = torch.where(batch.temperature > 0, batch.temperature, 1.0)[:, None]
    d = torch.where(finite, (zmax - z) / temp, float("inf"))
    return z, finite, d


def admissible(batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [B, V] bool, w [B, V] float32) for the sampling (T > 0) semantics of every row."""
    _, finite, d = distances(batch)
    v = batch.vocab
    w = torch.where(finite, torch.exp(-d), 0.0)

    # top-k: masked tokens sort last (d = inf, ties with legitimately infinite d are harmless:
    # "keep d <= inf" keeps every finite token, which is right when fewer than k are finite).
    k = batch.top_k.to(torch.int64)
    k_on = (k > 0) & (k < v)
    d_sorted, order = torch.sort(d, dim=1, stable=True)
    kth = d_sorted.gather(1, (k.clamp(1, v) - 1)[:, None])
    keep_k = finite & (~k_on[:, None] | (d <= kth))

    # top-p on the top-k survivors: mass strictly more probable than token i, by tie groups.
    wk = torch.where(keep_k, w, 0.0).double()
    wk_sorted = wk.gather(1, order)
    cum = torch.cumsum(wk_sorted, dim=1)
    first = torch.searchsorted(d_sorted.contiguous(), d.contiguous(), side="left")
    mass_lt = torch.where(first > 0, cum.gather(1, (first - 1).clamp(min=0)), 0.0)
    total = cum[:, -1:]
    p_on = batch.top_p < 1.0
    keep_p = ~p_on[:, None] | (mass_lt < batch.top_p.double()[:, None] * total)

    keep_m = w >= batch.min_p[:, None]
    return keep_k & keep_p & keep_m, w


def greedy_ids(z: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """argmax of z over finite tokens, lowest index on ties; -1 for rows with none."""
    best = torch.argmax(torch.where(finite, z, float("-inf")), dim=1)
    return torch.where(finite.any(dim=1), best, -1)


def probs(batch: SamplingBatch) -> torch.Tensor:
    """float32 [B, V]: the renormalised distribution over A (one-hot on the mode for greedy rows)."""
    z, finite, _ = distances(batch)
    allowed, w = admissible(batch)
    wa = torch.where(allowed, w, 0.0).double()
    total = wa.sum(dim=1, keepdim=True)
    out = torch.where(total > 0, wa / total.clamp(min=1e-300), 0.0).float()
    greedy = batch.temperature <= 0
    ids = greedy_ids(z, finite)
    onehot = torch.zeros_like(out)
    onehot.scatter_(1, ids.clamp(min=0)[:, None], 1.0)
    onehot = torch.where((ids >= 0)[:, None], onehot, 0.0)
    return torch.where(greedy[:, None], onehot, out)


def sample(batch: SamplingBatch) -> torch.Tensor:
    """int64 [B]: one Gumbel-max draw per row from probs(batch); -1 for rows with no admissible token."""
    z, finite, d = distances(batch)
    allowed, _ = admissible(batch)
    g = token_gumbel(row_key(batch.seed, batch.offset), batch.vocab)
    score = torch.where(allowed, g - d, float("-inf"))
    drawn = torch.argmax(score, dim=1)
    # Admissible tokens can all score -inf only if d = inf for all of them, impossible: d = 0 at the mode.
    drawn = torch.where(allowed.any(dim=1), drawn, -1)
    return torch.where(batch.temperature <= 0, greedy_ids(z, finite), drawn)
