"""Fused RAST sampling in Triton (backend "triton"): combine, temperature, top-k/top-p/min-p, draw.

Notation (rast_kernels.reference): z = logits + sum_k w_k (rl_k - base_k); d_i = (zmax - z_i)/T;
w_i = exp(-d_i); the float32 bit pattern of d >= 0 is a non-negative int32 ``key`` ordered as d, and
every filter keeps the finite tokens with key <= one threshold tau (plus min-p: w_i >= min_p).

sample() launches four kernels, with grids fixed by the shapes (CUDA-graph safe, no host sync):

1. ``_stats`` (grid B x S, the vocabulary split in S chunks so B = 1 still fills the GPU) reads the
   inputs once. It takes the per-row parameters as given (Python scalars as kernel arguments, tensors
   clamped in registers) and writes them once for the kernels after it, so a call issues no device
   work besides these four kernels (a fill per pair when λ is a Python scalar). Its loop over the
   chunk's blocks reduces nothing across lanes (rast_kernels.sampler_triton_stats): each lane keeps
   its LANE_KEEP = 4 best tokens (z, id) and summarises every token they displace by its max z and
   sum exp((z - lane max)/T). At the chunk's end it writes the max z (its first index on greedy rows),
   min z, finite count, and up to CAP *candidates*, stored exactly as (id, z) in a [B, S, CAP] scratch: the lane
   entries with z >= (the chunk's max) - margin, cut to the best CAP by a key floor when more remain.
   Every other finite token is a *non-candidate*, summarised exactly by its max z and approximately by
   sum exp(-(m - z)/T) (m: chunk max). The margin (d-space, times T), LANE_KEEP and the floor are
   heuristics: exactness never depends on them, only on every finite token being either stored or
   summarised. With min_p > 0 and no top-k the margin is -log(min_p) + 0.5 nats, else WIDE nats;
   rows without any filter store no candidates (they cannot take the fast path).
2. ``_select`` (grid B) reduces the partials (zmax, greedy id, count), and computes
   kc = key(max non-candidate z): by monotonicity of the rounded d, every non-candidate has key >= kc.
   U = {candidates with key < kc}, so every token outside U has a key larger than every key in U.
   On U alone (one flat register tile of SP * CAP slots, searches over the int key, each round one
   block-wide reduction: ternary for top-k, bisection for top-p):
     top-k: if |U| >= k, the k-th smallest key of U is the k-th smallest of the row;
     top-p: Z_K = mass of U below that key (top-k on), else mass of all candidates + non-candidate
            mass; tau = the largest t with mass(U, key < t) < top_p * Z_K. For t <= kc that mass is
            the row's own, so tau is the row's threshold whenever it lies below kc.
   The fast path holds (``fast``) iff every token outside U is provably excluded from A:
     top-k on: |U| >= k (k tokens of U beat it);
     otherwise: no non-candidate exists, or top-p is on and mass(U) >= top_p * Z_K (its strictly-
     more-probable mass already reaches the limit), or exp(-d(max non-candidate)) < min_p*(1 - 2^-10)
     (the slack covers tl.exp's error, see below, so no monotonicity of exp is assumed).
   Then A is a subset of U, tau applied to the whole row gives the same A, and the Gumbel-max draw
   over U is the draw over the row: same d bit for bit (z stored exactly, same div_rn), same RNG
   per token id, max of the same scores, lowest id on ties. When sampling, a fast row searches no
   threshold before it draws: it takes the best score x over U (min-p applied) and keeps it iff the
   test that decides tau keeps x's key (top-p: mass(U, key < key_x) < top_p * Z_K, the same sum;
   top-k: fewer than k keys of U below key_x), else rejects every key >= key_x and tries the next
   best (``_proven_draw``). With both, Z_K is bounded rather than searched (x in top-k puts
   mass(U, key < key_x) + w_x <= Z_K <= mass(U)), and a draw the bounds leave open makes the row
   search top-k, then draw as a top-p row. The first x kept is the best score over A, so the same
   token; three or four block-wide reductions a try instead of up to 31 rounds (and about 9-13 of the
   top-k search), and after PROOF_TRIES failures the row searches tau as above. Otherwise (decided per row on the
   device) it runs the exact radix descent over the whole row (``_descent``: several reads of the
   row by one program), except for rows filtered by top-p without top-k when sampling
   (``VERIFY_ROW``): those leave tau at the row's largest key, so A' = {finite, w >= min_p}, for step 4.
3. ``_draw`` (grid B x S): rows not drawn in step 2 read the row once more; each lane keeps its best
   Gumbel score g_i - d_i over A (A' for VERIFY_ROW rows) and its second best, and each chunk stores
   its DRAWS best lane winners plus a bound: no token of the chunk outside them scores above it. Fast
   rows return at once, reading nothing.
4. ``_finish`` (grid B): greedy rows take the mode, empty rows -1, fast rows their draw, rows with a
   searched tau the best of the chunk draws. A VERIFY_ROW row merges the chunk lists into the row's
   DRAWS best draws over A' and reads the row once: draw x lies in A iff the mass of the tokens with
   a smaller key is < top_p * Z (tau is the largest such key, and that mass grows with the key). The
   first draw in A, in score order, whose score beats every bound is the argmax over A of the same
   scores, so the very token the descent would give: every token scoring above it is among the
   draws, and those are not in A. For top_p = 0.95 the best draw over A' is in A with probability
   about 0.95, and all DRAWS of them miss it with about 0.05^8; when no draw is proven (a small top_p,
   or a tie with a bound) the row runs the descent and a draw over the row in _finish.

Why exact: A = {finite, key <= tau, w >= min_p} as in the spec, and argmax of g_i + log w_i over A
with i.i.d. Gumbel g_i is distributed as w_i / sum_A w. probs() runs steps 1-2 (same tau as sample),
then sums w over A and writes w / sum_A w (that output is [B, V] by definition).

HBM traffic of sample(), fast path: the inputs once (B*V*(1 + 2K) elements of the input dtype), plus
O(B*S) partials and the candidates stored (8 bytes each, at most B*S*CAP), read again in step 2. Off
the fast path a top-p row adds two reads (``_draw``'s, ``_finish``'s proof); other filtered rows the
descent's per-row passes (about 4-7 with 16 buckets) and ``_draw``'s read. Whether rows take it depends
on the data, WIDE, CAP and the chunk length: sample(batch, fast_out=t) reports it per row, and
bench/sampler_fastpath.py measures it on LM-like rows under the launch plan of any GPU (interpreted on
a CPU: the plan, not the hardware, decides). Rows with no filter at all always take the fallback.
A token goes to the summary when its lane holds four better ones or the chunk's floor cuts it; that
raises kc, so a row whose nucleus is wide (1000-2000 tokens) can miss the fast path where keeping each
chunk's exact best CAP would not, more often the more tokens a lane meets (hence LANE_TOKENS; keeping
2 a lane instead of 4 cost 3% of the fast paths at B = 32 and 256 in a NumPy simulation).

Bit agreement with the reference: z is computed pair by pair without FMA contraction
(enable_fp_fusion=False) and d with IEEE division (div_rn), so z, d and the keys are the
reference's bit for bit. Known inexactness:
- sums of w are float32 in another order than the reference (and than the fallback), so a token
  whose top-p mass sits within rounding of top_p * Z_K may be classified differently;
- natively tl.exp is a multiply by log2(e) and ex2.approx (relative error about d * 2^-24 plus
  2 ulp) and a plain ``/`` is div.full (2 ulp), so w and probs differ from torch's by about 1e-6
  relative: that can flip a near-tie between two Gumbel scores, or a token within a few ulp of the
  min-p bound (MINP_SLACK = 2^-10 stays far above the error for any d of a min-p survivor);
- on a GPU the launch plan (S, CAP) depends on the batch size, so that it fills the SMs at any B;
  the float32 order of the mass sums, and with it the rounding-boundary cases above, can then differ
  between a row sampled alone and in a batch (the interpreter's plan does not depend on B).
  tests/test_sampler.py checks on a GPU that LM-like rows at V = 152064 draw the same tokens at
  every batch size from 1 to 256.
"""
from __future__ import annotations

import torch

from rast_kernels.batch import PARAMS, SamplingBatch
from rast_kernels.launch import exact_fp_options, next_pow2
from rast_kernels.reference import combine
from rast_kernels.sampler_triton_finish import _finish
from rast_kernels.sampler_triton_kernels import _draw, _write_probs
from rast_kernels.sampler_triton_plan import _buckets, _hist_block, _plan, _stats_options, _warps, launch_plan
from rast_kernels.sampler_triton_select import _select
from rast_kernels.sampler_triton_stats import _stats

__all__ = ["sample", "probs", "launch_plan"]

MAX_PAIRS = 4  # more pairs are pre-combined in float32 by the reference formula (same rounding)
WIDE = 10.0  # candidate margin in nats for rows filtered by top-k or top-p (a heuristic, see above)
PROOF_TRIES = 8  # candidate draws _select tries to prove before it searches the threshold (_proven_draw)
DRAWS = 8  # Gumbel draws per chunk kept for _finish's proof; all 8 fall outside A w.p. ~ (1 - top_p)^8


def _inputs(batch: SamplingBatch) -> tuple[list, int]:
    """The 2 + 4 * MAX_PAIRS + 1 input arguments shared by every kernel, and the pair count."""
    logits, rl, base, weights = batch.logits, batch.rl, batch.base, batch.weights
    if len(rl) > MAX_PAIRS:
        logits, rl, base, weights = combine(batch), [], [], weights[:, :0]
    args: list = [logits, logits.stride(0)]
    for k in range(MAX_PAIRS):
        r, b = (rl[k], base[k]) if k < len(rl) else (logits, logits)
        args += [r, r.stride(0), b, b.stride(0)]
    args.append(weights.contiguous() if len(rl) else logits)
    return args, len(rl)


def _raw_params(batch: SamplingBatch) -> tuple[list, int]:
    """_stats' (pointer, scalar) argument pairs of the six per-row parameters, and ROWS, the bitmask of
    those given as tensors. A tensor's scalar and a scalar's pointer are placeholders it never reads."""
    args, rows = [], 0
    for i, name in enumerate(PARAMS):
        value = batch.params[name]
        if value.tensor is None:
            args += [batch.logits, value.scalar]
        else:
            args += [value.tensor.contiguous(), 0]
            rows |= 1 << i
    return args, rows


def _stats_and_select(batch: SamplingBatch, draw: bool, block: int | None, chunk: int | None, nb: int,
                      cap: int | None, warps: tuple[int | None, int | None] = (None, None), wide: float = WIDE,
                      verify: bool = False, tries: int = 0):
    """Launches _stats and _select; nb: the descent's histogram buckets, as _buckets resolved them."""
    bsz, v, dev = batch.batch, batch.vocab, batch.logits.device
    block, chunk, splits, cap = _plan(batch, block, chunk, cap)
    args, pairs = _inputs(batch)
    f32 = dict(device=dev, dtype=torch.float32)
    i32 = dict(device=dev, dtype=torch.int32)
    smax, smin, ncmax, ncsum = (torch.empty(bsz, splits, **f32) for _ in range(4))
    sidx, scnt, ccnt = (torch.empty(bsz, splits, **i32) for _ in range(3))
    cid = torch.empty(bsz, splits, cap, **i32)
    cz = torch.empty(bsz, splits, cap, **f32)
    pf, pk, pi = torch.empty(3, bsz, **f32), torch.empty(bsz, **i32), torch.empty(2, bsz, device=dev, dtype=torch.int64)
    raw, rows = _raw_params(batch)
    _stats[(bsz, splits)](*args, *raw, pf, pk, pi, smax, sidx, smin, scnt, cid, cz, ccnt, ncmax, ncsum,
                          v, chunk, splits, PAIRS=pairs, BLOCK=block, CAP=cap, WIDE=wide, ROWS=rows,
                          **_stats_options(warps[0]), **exact_fp_options())
    params = dict(temperature=pf[0], top_p=pf[1], min_p=pf[2], top_k=pk, seed=pi[0], offset=pi[1])
    row = dict(zmax=torch.empty(bsz, **f32), key=torch.empty(bsz, **i32),
               greedy=torch.empty(bsz, device=dev, dtype=torch.int64), count=torch.empty(bsz, **i32),
               fast=torch.empty(bsz, device=dev, dtype=torch.int64), tries=torch.empty(bsz, **i32))
    _select[(bsz,)](*args, smax, sidx, smin, scnt, cid, cz, ccnt, ncmax, ncsum, params["temperature"],
                    params["top_k"], params["top_p"], params["min_p"], params["seed"], params["offset"],
                    row["zmax"], row["key"], row["greedy"],
                    row["count"], row["fast"], row["tries"], v, splits, PAIRS=pairs, BLOCK=_hist_block(block), NB=nb,
                    LOG2_NB=nb.bit_length() - 1, SP=next_pow2(splits), CAP=cap, DRAW=draw, VERIFY=verify,
                    TRIES=tries, **_warps(warps[1], 8), **exact_fp_options())
    return args, pairs, block, chunk, splits, row, params


def sample(batch: SamplingBatch, *, block: int | None = None, chunk: int | None = None, nb: int | None = None,
           cap: int | None = None, warps: tuple[int | None, int | None] = (None, None), wide: float = WIDE,
           verify: bool = True, proof_tries: int = PROOF_TRIES, fast_out: torch.Tensor | None = None,
           path_out: torch.Tensor | None = None, tries_out: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [B]; block / chunk / nb (histogram buckets) / cap (candidates per chunk) / warps (num_warps
    of _stats and of _select; None: 8 each) / wide (the candidate margin in nats) /
    verify (False: top-p rows off the fast path search their threshold first, as probs() does) /
    proof_tries (0: fast rows search their threshold before they draw, as probs() does) override the
    launch plan, e.g. in tests and bench/sampler_plans.py. fast_out, an int64 [B] tensor, receives 1
    for rows that took the fast path and 0 otherwise; path_out, likewise, 2 for the fast path, 1 for a
    verified draw and 0 otherwise; tries_out, likewise, how many candidate draws a fast row tried
    before one was proven, plus K_SEARCHED (16) where that was after its top-k search, and 0 where its
    threshold was searched (for tests and benchmarks)."""
    bsz, dev = batch.batch, batch.logits.device
    for name, t in (("fast_out", fast_out), ("path_out", path_out), ("tries_out", tries_out)):
        if t is not None and (t.shape != (bsz,) or t.dtype != torch.int64 or t.device != dev or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous int64 [{bsz}] tensor on {dev}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    nb = _buckets(nb)
    if proof_tries < 0:
        raise ValueError(f"proof_tries must be >= 0, got {proof_tries}")
    args, pairs, block, chunk, splits, row, params = _stats_and_select(batch, True, block, chunk, nb, cap, warps,
                                                                       wide, verify, proof_tries)
    cscore = torch.empty(bsz, splits, DRAWS, device=dev, dtype=torch.float32)
    cidx = torch.empty(bsz, splits, DRAWS, device=dev, dtype=torch.int32)
    cbound = torch.empty(bsz, splits, device=dev, dtype=torch.float32)
    temp = params["temperature"]
    _draw[(bsz, splits)](*args, temp, params["min_p"], params["seed"], params["offset"], row["zmax"], row["key"],
                         row["count"], row["fast"], cscore, cidx, cbound, batch.vocab, chunk, splits,
                         SUM_MASS=False, PAIRS=pairs, BLOCK=block, M=DRAWS, **exact_fp_options())
    out = torch.empty(bsz, device=dev, dtype=torch.int64)
    path = path_out if path_out is not None else torch.empty(bsz, device=dev, dtype=torch.int64)
    _finish[(bsz,)](*args, temp, params["top_k"], params["top_p"], params["min_p"], params["seed"],
                    params["offset"], row["zmax"], row["key"], row["greedy"], row["count"], row["fast"], cscore,
                    cidx, cbound, out, path, batch.vocab, splits, PAIRS=pairs, SP=next_pow2(splits), M=DRAWS,
                    BLOCK=block, HIST_BLOCK=_hist_block(block), NB=nb, LOG2_NB=nb.bit_length() - 1,
                    **_warps(None, 8), **exact_fp_options())
    if fast_out is not None:
        fast_out.copy_((row["fast"] >= 0).to(torch.int64))
    if tries_out is not None:
        tries_out.copy_(row["tries"])
    return out


def probs(batch: SamplingBatch, *, block: int | None = None, chunk: int | None = None, nb: int | None = None,
          cap: int | None = None) -> torch.Tensor:
    """float32 [B, V]: w / sum_A w on A (one-hot on the mode for greedy rows, zeros for empty rows)."""
    args, pairs, block, chunk, splits, row, params = _stats_and_select(batch, False, block, chunk, _buckets(nb), cap)
    bsz, dev = batch.batch, batch.logits.device
    cmass = torch.empty(bsz, splits, device=dev, dtype=torch.float32)
    temp, min_p = params["temperature"], params["min_p"]
    _draw[(bsz, splits)](*args, temp, min_p, params["seed"], params["offset"], row["zmax"], row["key"],
                         row["count"], row["fast"], cmass, cmass, cmass, batch.vocab, chunk, splits,
                         SUM_MASS=True, PAIRS=pairs, BLOCK=block, M=1, **exact_fp_options())
    out = torch.empty(bsz, batch.vocab, device=dev, dtype=torch.float32)
    _write_probs[(bsz, splits)](*args, temp, min_p, row["zmax"], row["key"], row["greedy"], row["count"], cmass,
                                out, batch.vocab, chunk, splits, PAIRS=pairs, BLOCK=block,
                                SP=next_pow2(splits), **exact_fp_options())
    return out
