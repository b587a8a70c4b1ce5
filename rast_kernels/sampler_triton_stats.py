"""The one read of the sampler's inputs, ``_stats`` (grid B x S): per chunk of the vocabulary, the
partials that ``_select`` reduces and the chunk's candidates. The algorithm and its exactness argument
are in rast_kernels.sampler_triton.

Why lane-local: the loop over a chunk's blocks runs V / BLOCK times per row, and a block-wide reduction
costs barriers and shuffles. So nothing in it reduces across lanes. Each lane (one position of the
[BLOCK] tile, seeing every BLOCK-th token of the chunk) keeps its LANE_KEEP best tokens, and sums up the
tokens they displace. The chunk chooses its candidates among those lists once, at its end.
"""
from __future__ import annotations

import triton
import triton.language as tl

from rast_kernels.sampler_triton_common import BIG, FLOAT32_MAX, TINY, _clamp, _param, _z, _zkey

LANE_KEEP = 4  # tokens each lane keeps (written out in _keep): 2 lost ~3% of LM-like rows' fast paths
FLOOR_ROUNDS = tl.constexpr(8)  # ternary rounds of the candidate floor (_floor): 3**8 = 6561 parts of the range
ABSENT = tl.constexpr(-2**31)  # the key of a lane entry that is no candidate: below every z's _zkey


@triton.jit
def _margin(temp, top_k, top_p, min_p, V, WIDE: tl.constexpr):
    """The row's candidate margin in z units (d-space nats times T): -log(min_p) + 0.5 nats for min-p
    without top-k, else WIDE; -1 (no candidates) for greedy rows and rows without any filter."""
    k_on = (top_k > 0) & (top_k < V)
    nats = tl.where((min_p > 0) & ~k_on, 0.5 - tl.log(tl.maximum(min_p, 1e-30)), WIDE)
    filtered = k_on | (top_p < 1.0) | (min_p > 0)
    return tl.where(filtered & (temp > 0), nats * temp, -1.0)


@triton.jit
def _keep(z, offs, t0, i0, t1, i1, t2, i2, t3, i3):
    """Puts z (-inf: no token) into each lane's list t0 >= t1 >= t2 >= t3 (ids i0..i3; empty slots -inf).
    Strict comparisons: a lane sees increasing ids, so on ties the earlier token ranks first and t0, i0
    is the lane's first max. Returns the new list and the z it displaced (-inf: none)."""
    c0 = z > t0
    c1 = z > t1
    c2 = z > t2
    c3 = z > t3  # c0 implies c1 implies c2 implies c3: the list is sorted
    out = tl.where(c3, t3, z)
    t3n = tl.where(c2, t2, tl.where(c3, z, t3))
    i3n = tl.where(c2, i2, tl.where(c3, offs, i3))
    t2n = tl.where(c1, t1, tl.where(c2, z, t2))
    i2n = tl.where(c1, i1, tl.where(c2, offs, i2))
    t1n = tl.where(c0, t0, tl.where(c1, z, t1))
    i1n = tl.where(c0, i0, tl.where(c1, offs, i1))
    return tl.where(c0, z, t0), tl.where(c0, offs, i0), t1n, i1n, t2n, i2n, t3n, i3n, out


@triton.jit
def _entry_key(t, edge):
    """The key of lane entry t if it may be a candidate (finite, within the margin: t >= edge), else ABSENT."""
    return tl.where((t > float("-inf")) & (t >= edge), _zkey(t), ABSENT)


@triton.jit
def _floor(k0, k1, k2, k3, lo, hi, CAP: tl.constexpr):
    """A key floor with at most CAP of the keys k0..k3 (ABSENT entries aside) at or above it, searched in
    [lo, hi] (lo: at most the least key; hi: above the largest, known from the margin's edge and the
    chunk max without a reduction) by a ternary search: a round counts the keys at or above two pivots in
    one int32 sum (each count is at most 4 * BLOCK < 2**15, _stats' assert), one block-wide reduction, and keeps a third
    of the range. FLOOR_ROUNDS rounds leave it within 3**-FLOOR_ROUNDS of the range above the lowest such
    floor, which only moves a few near-floor tokens from the candidates to the summary (12 bisection steps
    took 12 reductions for 2**-12)."""
    lo = lo.to(tl.int64)
    hi = hi.to(tl.int64)
    for _ in range(FLOOR_ROUNDS):  # invariant: count(key >= hi) <= CAP
        m1 = lo + (hi - lo) // 3
        m2 = m1 + (hi - m1) // 2  # lo <= m1 <= m2 < hi while lo < hi
        # the pivots lie within the keys' int32 range; only hi - lo needs int64
        both = _at_or_above(k0, k1, k2, k3, m1.to(tl.int32)) + (_at_or_above(k0, k1, k2, k3, m2.to(tl.int32)) << 16)
        both = tl.sum(both, axis=0)
        fits1 = (both & 0xFFFF) <= CAP
        fits2 = (both >> 16) <= CAP
        go = lo < hi
        lo = tl.where(go & ~fits1, tl.where(fits2, m1 + 1, m2 + 1), lo)
        hi = tl.where(go, tl.where(fits1, m1, tl.where(fits2, m2, hi)), hi)
    return hi


@triton.jit
def _at_or_above(k0, k1, k2, k3, floor):
    """How many of a lane's four keys are >= floor."""
    return (k0 >= floor).to(tl.int32) + (k1 >= floor).to(tl.int32) + (k2 >= floor).to(tl.int32) + \
        (k3 >= floor).to(tl.int32)


@triton.jit
def _rel(x, ref, scale):
    """exp((x - ref) / T) as exp2((x - ref) * scale), scale = log2(e) / T, for x <= ref, ref finite: the
    difference is clamped to a finite value and scale is finite (clamped for a subnormal T; near 0, or
    flushed to it, for T near float32's max), so no product is inf * 0 and nothing is NaN. Compiled, exp2
    is ex2.approx.ftz: a term under 2**-126 of its reference (the lane's or the chunk's max) flushes to
    zero, far below float32's rounding of the row's mass."""
    return tl.math.exp2(tl.maximum(x - ref, -3.0e38) * scale)


@triton.jit
def _gone(t, kept, m, scale):
    """Per lane: (z, exp((z - m) / T)) of entry t if it is not a candidate, else (-inf, 0)."""
    gone = (t > float("-inf")) & ~kept
    return tl.where(gone, t, float("-inf")), tl.where(gone, _rel(t, m, scale), 0.0)


@triton.jit
def _stats(l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr,
           temp_ptr, temp_v, topk_ptr, topk_v, topp_ptr, topp_v, minp_ptr, minp_v, seed_ptr, seed_v, offset_ptr,
           offset_v, pf_ptr, pk_ptr, pi_ptr, smax_ptr, sidx_ptr, smin_ptr, scnt_ptr, cid_ptr, cz_ptr, ccnt_ptr,
           ncmax_ptr, ncsum_ptr, V, CHUNK, S, PAIRS: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr,
           WIDE: tl.constexpr, ROWS: tl.constexpr):
    """Per chunk: max z (its first index where the row does not sample), min z, finite count, and up to
    CAP candidates stored exactly (id, z): the best lane entries with z >= chunk max - margin, cut to CAP
    by a key floor (_floor).
    Every other finite token is a non-candidate, summarised by its max z and sum exp((z - m)/T) (m: the
    chunk max). Invariant: each finite token of the chunk is stored or summarised, never both: a lane
    entry is one or the other at the end, and a displaced token enters its lane's summary once.
    The row's parameters come raw (bit i of ROWS: parameter i is a tensor, else a scalar argument) and
    are clamped here; the chunk-0 program writes them to pf [temperature, top_p, min_p], pk [top_k] and
    pi [seed, offset] (each [3|1|2, B]), where the later kernels read them."""
    # a count reaches 4 * BLOCK (every lane entry): below 2^15, the high one shifted by 16 keeps the sign bit clear
    tl.static_assert(4 * BLOCK < 32768, "_floor packs two counts of the lane entries into one int32")
    row = tl.program_id(0)
    split = tl.program_id(1)
    lanes = tl.arange(0, BLOCK)
    out = row * S + split
    temp = _param(temp_ptr, row, temp_v, ROWS & 1, tl.float32)
    top_k = _param(topk_ptr, row, topk_v, (ROWS >> 1) & 1, tl.int32)
    top_p = _param(topp_ptr, row, topp_v, (ROWS >> 2) & 1, tl.float32)
    min_p = _param(minp_ptr, row, minp_v, (ROWS >> 3) & 1, tl.float32)
    # a NaN parameter empties the row (the spec); tested before clamping, which may map NaN to a bound
    valid = (temp == temp) & (top_p == top_p) & (min_p == min_p)
    temp = _clamp(temp, 0.0, FLOAT32_MAX)  # batch.PARAMS' range: inf / inf would make d NaN
    top_p = _clamp(top_p, TINY, 1.0)
    min_p = _clamp(min_p, 0.0, 1.0)
    if split == 0:
        rows = tl.num_programs(0)
        tl.store(pf_ptr + row, temp)
        tl.store(pf_ptr + rows + row, top_p)
        tl.store(pf_ptr + 2 * rows + row, min_p)
        tl.store(pk_ptr + row, top_k)
        tl.store(pi_ptr + row, _param(seed_ptr, row, seed_v, (ROWS >> 4) & 1, tl.int64))
        tl.store(pi_ptr + rows + row, _param(offset_ptr, row, offset_v, (ROWS >> 5) & 1, tl.int64))
    # the summary is approximate by design: no IEEE division, and log2(e) / T folded into one multiply;
    # finite for any T > 0 (see _rel)
    scale = tl.minimum(1.4426950408889634 / tl.where(temp > 0, temp, 1.0), 3.0e38)
    t0 = tl.full([BLOCK], float("-inf"), tl.float32)
    t1 = t0
    t2 = t0
    t3 = t0
    i0 = tl.full([BLOCK], BIG, tl.int32)
    i1 = i0
    i2 = i0
    i3 = i0
    low = tl.full([BLOCK], float("inf"), tl.float32)
    cnt = tl.zeros([BLOCK], tl.int32)
    lane_max = t0  # the lane's displaced tokens: max z, and sum exp((z - t0)/T) relative to the lane max
    lane_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(split * CHUNK, tl.minimum(split * CHUNK + CHUNK, V), BLOCK):
        offs = start + lanes
        mask = offs < V
        z = _z(row, offs, mask, l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s,
               r3, r3s, b3, b3s, w_ptr, PAIRS)
        z = tl.where(valid, z, float("nan"))
        ok = mask & (tl.abs(z) < float("inf"))  # false for NaN and +-inf
        low = tl.where(ok, tl.minimum(low, z), low)
        cnt += ok.to(tl.int32)
        was = t0
        t0, i0, t1, i1, t2, i2, t3, i3, gone = _keep(tl.where(ok, z, float("-inf")), offs,
                                                     t0, i0, t1, i1, t2, i2, t3, i3)
        lane_max = tl.maximum(lane_max, gone)
        # the lane's sum follows its max: rescaled when the max rose, then the displaced token added
        lane_sum = lane_sum * tl.where(was < t0, _rel(was, t0, scale), 1.0) + \
            tl.where(gone > float("-inf"), _rel(gone, t0, scale), 0.0)
    m = tl.max(t0, axis=0)
    tl.store(smax_ptr + out, m)
    if temp <= 0:  # the chunk's first max: only a row that does not sample reads it (as its mode)
        tl.store(sidx_ptr + out, tl.min(tl.where(t0 == m, i0, BIG), axis=0))
    tl.store(smin_ptr + out, tl.min(low, axis=0))
    tl.store(scnt_ptr + out, tl.sum(cnt, axis=0))

    # The candidates: lane entries within the margin of the chunk max, the best CAP of them by key.
    edge = m - _margin(temp, top_k, top_p, min_p, V, WIDE)  # > m when the row stores none
    k0 = _entry_key(t0, edge)
    k1 = _entry_key(t1, edge)
    k2 = _entry_key(t2, edge)
    k3 = _entry_key(t3, edge)
    n0 = (k0 > ABSENT).to(tl.int32)
    n1 = (k1 > ABSENT).to(tl.int32)
    n2 = (k2 > ABSENT).to(tl.int32)
    n3 = (k3 > ABSENT).to(tl.int32)
    if tl.sum(n0 + n1 + n2 + n3, axis=0) > CAP:
        floor = _floor(k0, k1, k2, k3, _zkey(edge), _zkey(m).to(tl.int64) + 1, CAP)
        n0 = tl.where(k0 >= floor, n0, 0)
        n1 = tl.where(k1 >= floor, n1, 0)
        n2 = tl.where(k2 >= floor, n2, 0)
        n3 = tl.where(k3 >= floor, n3, 0)
    per_lane = n0 + n1 + n2 + n3
    pos = out * CAP + tl.cumsum(per_lane, axis=0) - per_lane  # the lane's first slot
    tl.store(cid_ptr + pos, i0, mask=n0 > 0)
    tl.store(cz_ptr + pos, t0, mask=n0 > 0)
    pos += n0
    tl.store(cid_ptr + pos, i1, mask=n1 > 0)
    tl.store(cz_ptr + pos, t1, mask=n1 > 0)
    pos += n1
    tl.store(cid_ptr + pos, i2, mask=n2 > 0)
    tl.store(cz_ptr + pos, t2, mask=n2 > 0)
    pos += n2
    tl.store(cid_ptr + pos, i3, mask=n3 > 0)
    tl.store(cz_ptr + pos, t3, mask=n3 > 0)
    tl.store(ccnt_ptr + out, tl.sum(per_lane, axis=0))

    g0, s0 = _gone(t0, n0 > 0, m, scale)
    g1, s1 = _gone(t1, n1 > 0, m, scale)
    g2, s2 = _gone(t2, n2 > 0, m, scale)
    g3, s3 = _gone(t3, n3 > 0, m, scale)
    lane_sum = tl.where(t0 > float("-inf"), lane_sum * _rel(t0, m, scale), 0.0)
    tl.store(ncmax_ptr + out, tl.max(tl.maximum(tl.maximum(lane_max, tl.maximum(g0, g1)), tl.maximum(g2, g3)), axis=0))
    tl.store(ncsum_ptr + out, tl.sum(lane_sum + s0 + s1 + s2 + s3, axis=0))
