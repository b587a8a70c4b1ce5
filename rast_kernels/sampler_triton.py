"""Fused RAST sampling in Triton (backend "triton"): combine, temperature, top-k/top-p/min-p, draw.

Algorithm (per row; the spec and its notation d, w, A, key are in rast_kernels.reference):

1. ``_stats`` (grid B x S, the vocabulary split in S chunks so B = 1 still fills the GPU): one read
   of the inputs computes z = logits + sum_k w_k (rl_k - base_k) on the fly and keeps per chunk the
   max of z (first index on ties), the min of z and the number of finite tokens.
2. ``_threshold`` (grid B): reduces the S partials to zmax, the greedy id and the finite count, then
   finds the admissible threshold. With d_i = (zmax - z_i)/T >= 0, the float32 bit pattern of d is a
   non-negative int32 ``key`` whose order is the order of d, and every filter keeps the tokens with
   key <= some threshold (reference docstring). The threshold is found by a radix descent on the
   key: each pass histograms the keys inside the current range [lo, hi] into NB buckets (count,
   mass sum w, min key, max key), picks the bucket that holds the threshold, and shrinks the range
   to that bucket's [min key, max key] -- the actual keys present, so typical data needs a handful
   of passes and the descent always ends on one key, exactly. top-k picks the bucket where the count
   of keys below reaches k; top-p (over the top-k survivors) picks the last non-empty bucket whose
   smallest key has a strictly-more-probable mass < top_p * Z_K. Both predicates are monotone in the
   key, so the descent is a binary search with NB-ary fan-out and the result is the exact threshold
   of the spec (up to the float32 summation order of masses). min-p needs no search: w_i >= min_p is
   tested token by token. Rows without top-k/top-p (and greedy rows) skip the passes entirely.
3. ``_draw`` (grid B x S): one more read; each chunk keeps the best Gumbel score g_i - d_i over its
   admissible tokens (lowest index on ties) with g from the shared counter-based RNG
   (rast_kernels.rng, reimplemented here in uint32 arithmetic, so uniforms are bit-identical to the
   torch and native backends). ``_finish`` (grid B) reduces the S candidates in order.

Why exact: A is {finite, key <= threshold, w >= min_p} as in the spec, and the argmax of g_i + log w_i
over A with i.i.d. Gumbel g_i is distributed exactly as w_i / sum_A w (the Gumbel-max trick), so no
sort, cumsum or normalisation of the distribution is ever materialised. Only O(B x S) partials go
to global memory; nothing [B, V]-sized is written by sample(). probs() reuses steps 1-2 and writes
w_i / sum_A w (that output is [B, V] by definition).

Bit agreement with the reference: z is computed pair by pair without FMA contraction
(enable_fp_fusion=False) and d with IEEE division (div_rn), so z, d and the threshold keys are the
reference's bit for bit. Known inexactness: sums of w are float32 in a different order from the reference, so a token whose
top-p mass sits within rounding of top_p * Z_K may be classified differently; tl.exp / tl.log may
differ from torch in the last ulp, which can flip a near-tie between two Gumbel scores.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rast_kernels.batch import SamplingBatch
from rast_kernels.reference import combine

MAX_PAIRS = 4  # more pairs are pre-combined in float32 by the reference formula (same rounding)
BIG = tl.constexpr(2**31 - 1)  # "no index" and "no key": larger than any id and any finite-or-inf key


@triton.jit
def _z(row, offs, mask, l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr,
       PAIRS: tl.constexpr):
    """z for one block of tokens, accumulated pair by pair exactly as reference.combine does."""
    row = row.to(tl.int64)  # row * stride overflows int32 beyond 2**31 elements
    z = tl.load(l_ptr + row * l_stride + offs, mask=mask, other=0.0).to(tl.float32)
    if PAIRS > 0:
        w = tl.load(w_ptr + row * PAIRS + 0)
        r = tl.load(r0 + row * r0s + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b0 + row * b0s + offs, mask=mask, other=0.0).to(tl.float32)
        z = z + w * (r - b)
    if PAIRS > 1:
        w = tl.load(w_ptr + row * PAIRS + 1)
        r = tl.load(r1 + row * r1s + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b1 + row * b1s + offs, mask=mask, other=0.0).to(tl.float32)
        z = z + w * (r - b)
    if PAIRS > 2:
        w = tl.load(w_ptr + row * PAIRS + 2)
        r = tl.load(r2 + row * r2s + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b2 + row * b2s + offs, mask=mask, other=0.0).to(tl.float32)
        z = z + w * (r - b)
    if PAIRS > 3:
        w = tl.load(w_ptr + row * PAIRS + 3)
        r = tl.load(r3 + row * r3s + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b3 + row * b3s + offs, mask=mask, other=0.0).to(tl.float32)
        z = z + w * (r - b)
    return z


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (rast_kernels.rng.mix32); multiplications wrap modulo 2**32."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _row_key(seed, offset):
    """rast_kernels.rng.row_key for int64 scalars (two's complement words)."""
    k = _mix32((seed & 0xFFFFFFFF).to(tl.uint32) ^ 0x9E3779B9)
    k = _mix32(k ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    k = _mix32(k ^ (offset & 0xFFFFFFFF).to(tl.uint32))
    return _mix32(k ^ ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32))


@triton.jit
def _stats(l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr,
           smax_ptr, sidx_ptr, smin_ptr, scnt_ptr, V, CHUNK, S,
           PAIRS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK], BIG, tl.int32)
    low = tl.full([BLOCK], float("inf"), tl.float32)
    cnt = tl.zeros([BLOCK], tl.int32)
    for start in range(split * CHUNK, tl.minimum(split * CHUNK + CHUNK, V), BLOCK):
        offs = start + lanes
        mask = offs < V
        z = _z(row, offs, mask, l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s,
               r3, r3s, b3, b3s, w_ptr, PAIRS)
        ok = mask & (tl.abs(z) < float("inf"))  # false for NaN and +-inf
        better = ok & (z > best)  # strict: each lane sees increasing ids, so it keeps the first max
        best_i = tl.where(better, offs, best_i)
        best = tl.where(better, z, best)
        low = tl.where(ok, tl.minimum(low, z), low)
        cnt += ok.to(tl.int32)
    m = tl.max(best, axis=0)
    out = row * S + split
    tl.store(smax_ptr + out, m)
    tl.store(sidx_ptr + out, tl.min(tl.where(best == m, best_i, BIG), axis=0))
    tl.store(smin_ptr + out, tl.min(low, axis=0))
    tl.store(scnt_ptr + out, tl.sum(cnt, axis=0))


@triton.jit
def _histogram(row, lo, hi, shift, limit_key, zmax, temp, V,
               l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr,
               PAIRS: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr):
    """(count, mass, min key, max key) per bucket (key - lo) >> shift of finite keys in [lo, hi]."""
    lanes = tl.arange(0, BLOCK)
    bins = tl.arange(0, NB)
    cnt = tl.zeros([NB], tl.int32)
    mass = tl.zeros([NB], tl.float32)
    kmin = tl.full([NB], BIG, tl.int32)
    kmax = tl.full([NB], -1, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + lanes
        mask = offs < V
        z = _z(row, offs, mask, l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s,
               r3, r3s, b3, b3s, w_ptr, PAIRS)
        d = tl.math.div_rn(zmax - z, temp)  # IEEE division, as torch: keys match the reference
        key = d.to(tl.int32, bitcast=True)
        inside = mask & (tl.abs(z) < float("inf")) & (key >= lo) & (key <= hi) & (key <= limit_key)
        hit = inside[:, None] & (((key - lo) >> shift)[:, None] == bins[None, :])
        cnt += tl.sum(hit.to(tl.int32), axis=0)
        mass += tl.sum(tl.where(hit, tl.exp(-d)[:, None], 0.0), axis=0)
        kmin = tl.minimum(kmin, tl.min(tl.where(hit, key[:, None], BIG), axis=0))
        kmax = tl.maximum(kmax, tl.max(tl.where(hit, key[:, None], -1), axis=0))
    return cnt, mass, kmin, kmax


@triton.jit
def _shift_for(width, LOG2_NB: tl.constexpr):
    """A shift with 1 <= (width >> shift) < NB for width >= 1, so lo and hi land in different buckets.
    floor(log2(width)) comes from the float32 exponent; if rounding overestimates it by one, the
    quotient is still >= NB / 4 >= 1."""
    e = (width.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
    return tl.maximum(e - LOG2_NB + 1, 0)


@triton.jit
def _threshold(l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr,
               smax_ptr, sidx_ptr, smin_ptr, scnt_ptr, temp_ptr, topk_ptr, topp_ptr,
               zmax_ptr, key_ptr, greedy_ptr, cnt_ptr, V, S,
               PAIRS: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr, LOG2_NB: tl.constexpr,
               SP: tl.constexpr):
    row = tl.program_id(0)
    parts = tl.arange(0, SP)
    pmask = parts < S
    pmax = tl.load(smax_ptr + row * S + parts, mask=pmask, other=float("-inf"))
    zmax = tl.max(pmax, axis=0)
    # Every chunk's index is its own first max; the lowest over chunks holding zmax is the row's.
    greedy = tl.min(tl.where(pmask & (pmax == zmax), tl.load(sidx_ptr + row * S + parts, mask=pmask, other=BIG),
                             BIG), axis=0)
    zmin = tl.min(tl.load(smin_ptr + row * S + parts, mask=pmask, other=float("inf")), axis=0)
    count = tl.sum(tl.load(scnt_ptr + row * S + parts, mask=pmask, other=0), axis=0)
    temp = tl.load(temp_ptr + row)
    k = tl.load(topk_ptr + row)
    p = tl.load(topp_ptr + row)
    tl.store(zmax_ptr + row, zmax)
    tl.store(greedy_ptr + row, tl.where(count > 0, greedy, -1).to(tl.int64))
    tl.store(cnt_ptr + row, count)
    sampling = (temp > 0) & (count > 0)
    safe_t = tl.where(sampling, temp, 1.0)
    top = tl.math.div_rn(zmax - zmin, safe_t).to(tl.int32, bitcast=True)  # the largest key of the row
    if sampling & (k > 0) & (k < count):
        lo = 0
        hi = top
        below = 0
        while lo < hi:
            shift = _shift_for(hi - lo, LOG2_NB)
            cnt, mass, kmin, kmax = _histogram(row, lo, hi, shift, top, zmax, safe_t, V, l_ptr, l_stride,
                                               r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s,
                                               r3, r3s, b3, b3s, w_ptr,
                                               PAIRS, BLOCK, NB)
            incl = below + tl.cumsum(cnt, axis=0)
            b = tl.min(tl.where(incl >= k, tl.arange(0, NB), NB), axis=0)
            pick = tl.arange(0, NB) == b
            below = tl.sum(tl.where(pick, incl - cnt, 0), axis=0)
            lo = tl.sum(tl.where(pick, kmin, 0), axis=0)
            hi = tl.sum(tl.where(pick, kmax, 0), axis=0)
        top = lo
    if sampling & (p < 1.0):
        lo = 0
        hi = top
        below_mass = 0.0
        limit = -1.0
        while lo < hi:
            shift = _shift_for(hi - lo, LOG2_NB)
            cnt, mass, kmin, kmax = _histogram(row, lo, hi, shift, top, zmax, safe_t, V, l_ptr, l_stride,
                                               r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s,
                                               r3, r3s, b3, b3s, w_ptr,
                                               PAIRS, BLOCK, NB)
            if limit < 0.0:  # the first pass covers every top-k survivor: its mass is Z_K
                limit = p * tl.sum(mass, axis=0)
            bins = tl.arange(0, NB)
            excl = below_mass + tl.sum(tl.where(bins[None, :] < bins[:, None], mass[None, :], 0.0), axis=1)
            b = tl.max(tl.where((cnt > 0) & (excl < limit), tl.arange(0, NB), -1), axis=0)
            pick = tl.arange(0, NB) == b
            below_mass = tl.sum(tl.where(pick, excl, 0.0), axis=0)
            lo = tl.sum(tl.where(pick, kmin, 0), axis=0)
            hi = tl.sum(tl.where(pick, kmax, 0), axis=0)
        top = lo
    tl.store(key_ptr + row, top)


@triton.jit
def _admissible(row, offs, mask, zmax, temp, top, min_p, l_ptr, l_stride,
                r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr,
                PAIRS: tl.constexpr):
    """(A mask, d, w) for one block: finite, key <= threshold, w >= min_p."""
    z = _z(row, offs, mask, l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s,
           r3, r3s, b3, b3s, w_ptr, PAIRS)
    d = tl.math.div_rn(zmax - z, temp)  # IEEE division, as torch: keys match the reference
    w = tl.exp(-d)
    ok = mask & (tl.abs(z) < float("inf")) & (d.to(tl.int32, bitcast=True) <= top) & (w >= min_p)
    return ok, d, w


@triton.jit
def _draw(l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr,
          temp_ptr, minp_ptr, seed_ptr, offset_ptr, zmax_ptr, key_ptr, cnt_ptr, cscore_ptr, cidx_ptr,
          V, CHUNK, S, SUM_MASS: tl.constexpr, PAIRS: tl.constexpr, BLOCK: tl.constexpr):
    """Per chunk: the best Gumbel score over A and its id, or (SUM_MASS) the sum of w over A."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK], BIG, tl.int32)
    total = tl.zeros([BLOCK], tl.float32)
    temp = tl.load(temp_ptr + row)
    if (temp > 0) & (tl.load(cnt_ptr + row) > 0):
        zmax = tl.load(zmax_ptr + row)
        top = tl.load(key_ptr + row)
        min_p = tl.load(minp_ptr + row)
        rkey = _row_key(tl.load(seed_ptr + row), tl.load(offset_ptr + row))
        for start in range(split * CHUNK, tl.minimum(split * CHUNK + CHUNK, V), BLOCK):
            offs = start + lanes
            mask = offs < V
            ok, d, w = _admissible(row, offs, mask, zmax, temp, top, min_p, l_ptr, l_stride,
                                   r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s,
                                   w_ptr, PAIRS)
            if SUM_MASS:
                total += tl.where(ok, w, 0.0)
            else:
                bits = _mix32(_mix32(offs.to(tl.uint32) ^ rkey) + rkey)
                u = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23, see rng.py
                score = tl.where(ok, -tl.log(-tl.log(u)) - d, float("-inf"))
                better = score > best  # strict: lanes see increasing ids, so ties keep the lowest
                best_i = tl.where(better, offs, best_i)
                best = tl.where(better, score, best)
    out = row * S + split
    if SUM_MASS:
        tl.store(cscore_ptr + out, tl.sum(total, axis=0))
    else:
        m = tl.max(best, axis=0)
        tl.store(cscore_ptr + out, m)
        tl.store(cidx_ptr + out, tl.min(tl.where(best == m, best_i, BIG), axis=0))


@triton.jit
def _finish(temp_ptr, greedy_ptr, cnt_ptr, cscore_ptr, cidx_ptr, out_ptr, S, SP: tl.constexpr):
    """Reduce the S chunk candidates in order; greedy rows take the mode, empty rows -1."""
    row = tl.program_id(0)
    parts = tl.arange(0, SP)
    pmask = parts < S
    score = tl.load(cscore_ptr + row * S + parts, mask=pmask, other=float("-inf"))
    m = tl.max(score, axis=0)
    idx = tl.min(tl.where(pmask & (score == m), tl.load(cidx_ptr + row * S + parts, mask=pmask, other=BIG), BIG),
                 axis=0)
    drawn = tl.where(idx == BIG, -1, idx).to(tl.int64)
    drawn = tl.where(tl.load(cnt_ptr + row) > 0, drawn, -1)
    tl.store(out_ptr + row, tl.where(tl.load(temp_ptr + row) > 0, drawn, tl.load(greedy_ptr + row)))


@triton.jit
def _write_probs(l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr,
                 temp_ptr, minp_ptr, zmax_ptr, key_ptr, greedy_ptr, cnt_ptr, cmass_ptr, out_ptr,
                 V, CHUNK, S, PAIRS: tl.constexpr, BLOCK: tl.constexpr, SP: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    lanes = tl.arange(0, BLOCK)
    parts = tl.arange(0, SP)
    total = tl.sum(tl.load(cmass_ptr + row * S + parts, mask=parts < S, other=0.0), axis=0)
    temp = tl.load(temp_ptr + row)
    sampling = (temp > 0) & (tl.load(cnt_ptr + row) > 0)
    greedy = tl.load(greedy_ptr + row)
    zmax = tl.load(zmax_ptr + row)
    top = tl.load(key_ptr + row)
    min_p = tl.load(minp_ptr + row)
    safe_t = tl.where(sampling, temp, 1.0)
    for start in range(split * CHUNK, tl.minimum(split * CHUNK + CHUNK, V), BLOCK):
        offs = start + lanes
        mask = offs < V
        ok, d, w = _admissible(row, offs, mask, zmax, safe_t, top, min_p, l_ptr, l_stride,
                               r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s,
                               w_ptr, PAIRS)
        p = tl.where(ok, w / tl.where(total > 0, total, 1.0), 0.0)
        p = tl.where(sampling, p, tl.where(offs == greedy, 1.0, 0.0))
        tl.store(out_ptr + row.to(tl.int64) * V + offs, p, mask=mask)


def _options() -> dict:
    """No FMA contraction, so z = logits + w * (rl - base) rounds exactly as the torch reference does."""
    return {} if _interpreting() else {"enable_fp_fusion": False}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _plan(batch: SamplingBatch, block: int | None, chunk: int | None) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, S): chunks are whole blocks; S chunks per row give about 4 programs per SM."""
    v = batch.vocab
    if block is None:
        block = 128 if _interpreting() else 1024
    block = min(block, triton.next_power_of_2(v))
    if chunk is None:
        if batch.logits.is_cuda:
            sms = torch.cuda.get_device_properties(batch.logits.device).multi_processor_count
            splits = max(1, min(triton.cdiv(4 * sms, batch.batch), triton.cdiv(v, block)))
        else:
            splits = min(4, triton.cdiv(v, block))
        chunk = triton.cdiv(v, splits)
    chunk = triton.cdiv(max(chunk, 1), block) * block
    return block, chunk, triton.cdiv(v, chunk)


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


def _stats_and_threshold(batch: SamplingBatch, block: int | None, chunk: int | None, nb: int | None):
    if nb is None:  # the interpreter pays per operation, not per element: fewer, wider passes
        nb = 256 if _interpreting() else 16
    if nb < 4 or nb & (nb - 1):
        raise ValueError(f"nb (histogram buckets) must be a power of two >= 4, got {nb}")
    bsz, v, dev = batch.batch, batch.vocab, batch.logits.device
    block, chunk, splits = _plan(batch, block, chunk)
    args, pairs = _inputs(batch)
    smax = torch.empty(bsz, splits, device=dev, dtype=torch.float32)
    smin, sidx, scnt = torch.empty_like(smax), torch.empty_like(smax, dtype=torch.int32), torch.empty_like(
        smax, dtype=torch.int32)
    _stats[(bsz, splits)](*args, smax, sidx, smin, scnt, v, chunk, splits, PAIRS=pairs, BLOCK=block, **_options())
    row = dict(zmax=torch.empty(bsz, device=dev, dtype=torch.float32),
               key=torch.empty(bsz, device=dev, dtype=torch.int32),
               greedy=torch.empty(bsz, device=dev, dtype=torch.int64),
               count=torch.empty(bsz, device=dev, dtype=torch.int32))
    hist_block = min(256, block) if not _interpreting() else block
    _threshold[(bsz,)](*args, smax, sidx, smin, scnt, batch.temperature.contiguous(), batch.top_k.contiguous(),
                       batch.top_p.contiguous(), row["zmax"], row["key"], row["greedy"], row["count"], v, splits,
                       PAIRS=pairs, BLOCK=hist_block, NB=nb, LOG2_NB=nb.bit_length() - 1,
                       SP=triton.next_power_of_2(splits), **_options())
    return args, pairs, block, chunk, splits, row


def sample(batch: SamplingBatch, *, block: int | None = None, chunk: int | None = None,
           nb: int | None = None) -> torch.Tensor:
    """int64 [B]; block / chunk / nb (histogram buckets) override the launch plan, e.g. in tests."""
    args, pairs, block, chunk, splits, row = _stats_and_threshold(batch, block, chunk, nb)
    bsz, dev = batch.batch, batch.logits.device
    cscore = torch.empty(bsz, splits, device=dev, dtype=torch.float32)
    cidx = torch.empty(bsz, splits, device=dev, dtype=torch.int32)
    temp = batch.temperature.contiguous()
    _draw[(bsz, splits)](*args, temp, batch.min_p.contiguous(), batch.seed.contiguous(), batch.offset.contiguous(),
                         row["zmax"], row["key"], row["count"], cscore, cidx, batch.vocab, chunk, splits,
                         SUM_MASS=False, PAIRS=pairs, BLOCK=block, **_options())
    out = torch.empty(bsz, device=dev, dtype=torch.int64)
    _finish[(bsz,)](temp, row["greedy"], row["count"], cscore, cidx, out, splits,
                    SP=triton.next_power_of_2(splits), **_options())
    return out


def probs(batch: SamplingBatch, *, block: int | None = None, chunk: int | None = None,
          nb: int | None = None) -> torch.Tensor:
    """float32 [B, V]: w / sum_A w on A (one-hot on the mode for greedy rows, zeros for empty rows)."""
    args, pairs, block, chunk, splits, row = _stats_and_threshold(batch, block, chunk, nb)
    bsz, dev = batch.batch, batch.logits.device
    cmass = torch.empty(bsz, splits, device=dev, dtype=torch.float32)
    temp, min_p = batch.temperature.contiguous(), batch.min_p.contiguous()
    _draw[(bsz, splits)](*args, temp, min_p, batch.seed.contiguous(), batch.offset.contiguous(),
                         row["zmax"], row["key"], row["count"], cmass, cmass, batch.vocab, chunk, splits,
                         SUM_MASS=True, PAIRS=pairs, BLOCK=block)
    out = torch.empty(bsz, batch.vocab, device=dev, dtype=torch.float32)
    _write_probs[(bsz, splits)](*args, temp, min_p, row["zmax"], row["key"], row["greedy"], row["count"], cmass,
                                out, batch.vocab, chunk, splits, PAIRS=pairs, BLOCK=block,
                                SP=triton.next_power_of_2(splits), **_options())
    return out
