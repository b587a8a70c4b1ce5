"""The per-row kernel of the Triton sampler: ``_select`` reduces the chunk partials and, when the
candidates provably contain the admissible set, draws the token from them, proving the draw against
the filters (``_proven_draw``) or else finding the threshold among them first; otherwise it runs the
exact radix descent over the whole row. The algorithm and its exactness argument are in
rast_kernels.sampler_triton."""
from __future__ import annotations

import triton
import triton.language as tl

from rast_kernels.sampler_triton_common import BIG, _gumbel_score, _row_key, _z
from rast_kernels.sampler_triton_proven import _best, _kth_key, _largest, _proven_draw

MINP_SLACK = tl.constexpr(1.0 - 2.0**-10)  # >> tl.exp's error (sampler_triton): no monotonicity assumed
K_SEARCHED = tl.constexpr(16)  # added to tries_out where a row's draws were proven only after its top-k search
VERIFY_ROW = tl.constexpr(-3)  # fast-flag mark: top-p alone, drawn over {finite, w >= min_p}, checked by _finish


@triton.jit
def _histogram(row, lo, hi, shift, limit_key, zmax, temp, V,
               l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr,
               PAIRS: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr):
    """(count, mass, min key, max key) per bucket (key - lo) >> shift of finite keys in [lo, hi].
    Each lane accumulates its own [NB] partials across the loop and the lanes are reduced once at the
    end: a reduction per block and statistic costs block-wide barriers, and this loop runs V / BLOCK
    times in one program per row."""
    lanes = tl.arange(0, BLOCK)[:, None]  # [BLOCK, 1]: computed in the tile's own layout, never converted
    bins = tl.arange(0, NB)[None, :]
    cnt = tl.zeros([BLOCK, NB], tl.int32)
    mass = tl.zeros([BLOCK, NB], tl.float32)
    kmin = tl.full([BLOCK, NB], BIG, tl.int32)
    kmax = tl.full([BLOCK, NB], -1, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + lanes
        mask = offs < V
        z = _z(row, offs, mask, l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s,
               r3, r3s, b3, b3s, w_ptr, PAIRS)
        d = tl.math.div_rn(zmax - z, temp)  # IEEE division, as torch: keys match the reference
        key = d.to(tl.int32, bitcast=True)
        inside = mask & (tl.abs(z) < float("inf")) & (key >= lo) & (key <= hi) & (key <= limit_key)
        hit = inside & (((key - lo) >> shift) == bins)
        cnt += hit.to(tl.int32)
        mass += tl.where(hit, tl.exp(-d), 0.0)
        kmin = tl.minimum(kmin, tl.where(hit, key, BIG))
        kmax = tl.maximum(kmax, tl.where(hit, key, -1))
    return tl.sum(cnt, axis=0), tl.sum(mass, axis=0), tl.min(kmin, axis=0), tl.max(kmax, axis=0)


@triton.jit
def _shift_for(width, LOG2_NB: tl.constexpr):
    """A shift with 1 <= (width >> shift) < NB for width >= 1, so lo and hi land in different buckets.
    floor(log2(width)) comes from the float32 exponent; if rounding overestimates it by one, the
    quotient is still >= NB / 4 >= 1."""
    e = (width.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
    return tl.maximum(e - LOG2_NB + 1, 0)


@triton.jit
def _descent(row, top, k, p, k_on, zmax, temp, V,
             l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr,
             PAIRS: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr, LOG2_NB: tl.constexpr):
    """The fallback: the exact threshold key by NB-ary radix descent over the whole row (top: the
    row's largest key). Each pass narrows [lo, hi] to the actual keys of the bucket holding it."""
    if k_on:
        lo = 0
        hi = top
        below = 0
        while lo < hi:
            shift = _shift_for(hi - lo, LOG2_NB)
            cnt, mass, kmin, kmax = _histogram(row, lo, hi, shift, top, zmax, temp, V, l_ptr, l_stride,
                                               r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s,
                                               r3, r3s, b3, b3s, w_ptr, PAIRS, BLOCK, NB)
            incl = below + tl.cumsum(cnt, axis=0)
            b = tl.min(tl.where(incl >= k, tl.arange(0, NB), NB), axis=0)
            pick = tl.arange(0, NB) == b
            below = tl.sum(tl.where(pick, incl - cnt, 0), axis=0)
            lo = tl.sum(tl.where(pick, kmin, 0), axis=0)
            hi = tl.sum(tl.where(pick, kmax, 0), axis=0)
        top = lo
    if p < 1.0:
        lo = 0
        hi = top
        below_mass = 0.0
        limit = -1.0
        while lo < hi:
            shift = _shift_for(hi - lo, LOG2_NB)
            cnt, mass, kmin, kmax = _histogram(row, lo, hi, shift, top, zmax, temp, V, l_ptr, l_stride,
                                               r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s,
                                               r3, r3s, b3, b3s, w_ptr, PAIRS, BLOCK, NB)
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
    return top


@triton.jit
def _select(l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr,
            smax_ptr, sidx_ptr, smin_ptr, scnt_ptr, cid_ptr, cz_ptr, ccnt_ptr, ncmax_ptr, ncsum_ptr,
            temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr, offset_ptr,
            zmax_ptr, key_ptr, greedy_ptr, cnt_ptr, fast_ptr, tries_ptr, V, S,
            PAIRS: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr, LOG2_NB: tl.constexpr,
            SP: tl.constexpr, CAP: tl.constexpr, DRAW: tl.constexpr, VERIFY: tl.constexpr, TRIES: tl.constexpr):
    # the high count of _kth_key counts keys <= a pivot below U's largest key, so at most SP * CAP - 1 <= 2^15 - 1:
    # shifted by 16 it keeps the sign bit clear
    tl.static_assert(SP * CAP < 65536, "_kth_key packs two counts of the candidate tile into one int32")
    row = tl.program_id(0)
    parts = tl.arange(0, SP)
    pmask = parts < S
    pmax = tl.load(smax_ptr + row * S + parts, mask=pmask, other=float("-inf"))
    zmax = tl.max(pmax, axis=0)
    count = tl.sum(tl.load(scnt_ptr + row * S + parts, mask=pmask, other=0), axis=0)
    temp = tl.load(temp_ptr + row)
    k = tl.load(topk_ptr + row)
    p = tl.load(topp_ptr + row)
    min_p = tl.load(minp_ptr + row)
    sampling = (temp > 0) & (count > 0)
    # Each block-wide reduction below runs only on the rows that read its result (a sampled row on the
    # fast path skips four): at small batch _select's time is its chain of reductions, not its loads.
    greedy = -1  # the mode, read only where the row does not sample
    if sampling == 0:  # every chunk's index is its own first max; the lowest over chunks holding zmax is the row's
        greedy = tl.min(tl.where(pmask & (pmax == zmax), tl.load(sidx_ptr + row * S + parts, mask=pmask, other=BIG),
                                 BIG), axis=0)
    safe_t = tl.where(sampling, temp, 1.0)
    k_on = (k > 0) & (k < count)
    p_on = p < 1.0

    # The candidates of all chunks as one flat tile of SP * CAP slots (chunk c's slots at c * CAP, as
    # stored); U = candidates with key < kc, the smallest key any non-candidate can have, so every
    # token outside U has a key >= kc > every key in U.
    slot = tl.arange(0, SP * CAP)
    part = slot // CAP
    have = (part < S) & (slot % CAP < tl.load(ccnt_ptr + row * S + part, mask=part < S, other=0))
    at = row * S * CAP + slot
    cz = tl.load(cz_ptr + at, mask=have, other=0.0)
    cid = tl.load(cid_ptr + at, mask=have, other=0)
    d = tl.math.div_rn(zmax - cz, safe_t)  # the same d, bit for bit, as every full-row kernel
    ck = tl.where(have, d.to(tl.int32, bitcast=True), BIG)
    w = tl.where(have, tl.exp(-d), 0.0)
    zc = tl.max(tl.load(ncmax_ptr + row * S + parts, mask=pmask, other=float("-inf")), axis=0)
    kc = tl.where(zc > float("-inf"), tl.math.div_rn(zmax - zc, safe_t).to(tl.int32, bitcast=True), BIG)
    in_u = ck < kc
    n_u = 0
    if k_on:
        n_u = tl.sum(in_u.to(tl.int32), axis=0)
    k_fast = sampling & k_on & (n_u >= k)  # the k-th smallest key of the row is the k-th smallest of U
    tau = BIG  # the threshold, BIG until a search sets it (every key of U lies below it)
    # top-k with top-p, drawn: the draws bound Z_K before any top-k search (_proven_draw's kp_check)
    k_later = k_fast & p_on & (DRAW != 0) & (TRIES > 0)
    if k_fast & (p_on | (DRAW == 0)) & (k_later == 0):  # the draw below checks top-k alone itself
        tau = _kth_key(ck, in_u, k, _largest(ck, in_u))
    mass_u = tl.sum(tl.where(in_u & (ck <= tau), w, 0.0), axis=0)  # U within top-k
    z_k = mass_u  # Z_K, top-p's reference mass: with top-k on (and n_u >= k) K lies inside U
    if (k_on == 0) & p_on:  # K is every finite token: the candidates and the non-candidates' summaries
        chunk_scale = tl.exp(-tl.math.div_rn(zmax - pmax, safe_t))
        nc_mass = tl.sum(tl.where(pmask & (pmax > float("-inf")),
                                  tl.load(ncsum_ptr + row * S + parts, mask=pmask, other=0.0) * chunk_scale, 0.0),
                         axis=0)
        z_k = tl.sum(w, axis=0) + nc_mass
    limit = p * z_k
    # Every token outside U is excluded: by top-k (k keys of U lie below it), by top-p (U's mass
    # alone reaches the limit), by min-p (w < min_p at the largest non-candidate), or none exists.
    minp_out = tl.exp(-tl.math.div_rn(zmax - zc, safe_t)) < min_p * MINP_SLACK
    others_out = (kc == BIG) | (p_on & (mass_u >= limit)) | minp_out
    fast = k_fast | (sampling & (k_on == 0) & others_out)
    drawn = -1
    tries = 0
    if DRAW:  # the Gumbel-max draw over A; A lies inside U on fast rows, so it is the draw over the row
        rkey = _row_key(tl.load(seed_ptr + row), tl.load(offset_ptr + row))
        score = tl.where(in_u & (ck <= tau) & (w >= min_p), _gumbel_score(cid, rkey, d), float("-inf"))
        if fast:
            drawn, tries = _proven_draw(score, cid, ck, w, in_u, k, limit, k_on & (p_on == 0), p_on & (k_later == 0),
                                        k_later, p, mass_u, TRIES)
    search = fast & (drawn < 0)  # fast rows whose draw no proof settled (every fast row in probs)
    if DRAW:
        if search & k_on & ((p_on == 0) | k_later):  # the top-k search the draws did without
            tau = _kth_key(ck, in_u, k, _largest(ck, in_u))
            if k_later:  # Z_K, so top-p's limit, now known: prove draws within top-k as any top-p row does
                limit = p * tl.sum(tl.where(in_u & (ck <= tau), w, 0.0), axis=0)
                drawn, tries = _proven_draw(tl.where(ck <= tau, score, float("-inf")), cid, ck, w, in_u, k, limit,
                                            False, True, False, p, mass_u, TRIES)
                tries = tl.where(drawn >= 0, tries + K_SEARCHED, 0)
                search = drawn < 0
    if search & p_on:  # the largest t with mass(U, key < t) < top_p * Z_K; on keys <= kc that is the row's mass
        lo = 0
        hi = tau
        if hi == BIG:  # no top-k search set it: start from U's largest key
            hi = _largest(ck, in_u)
        while lo < hi:
            mid = lo + (hi - lo + 1) // 2
            under = tl.sum(tl.where(in_u & (ck < mid), w, 0.0), axis=0) < limit
            lo = tl.where(under, mid, lo)
            hi = tl.where(under, hi, mid - 1)
        tau = lo
    if DRAW:
        if search:
            drawn = _best(tl.where(ck <= tau, score, float("-inf")), cid)
    top = tau  # a fast row keeps its own threshold: BIG where no filter of U needs one (min-p alone)
    if fast == 0:
        zmin = tl.min(tl.load(smin_ptr + row * S + parts, mask=pmask, other=float("inf")), axis=0)
        top = tl.math.div_rn(zmax - zmin, safe_t).to(tl.int32, bitcast=True)  # the largest key of the row
        tau = top
    # Top-p alone, without the fast path: _draw draws over {finite, w >= min_p} and _finish proves the
    # draw lies in A with one read of the row, instead of a descent of several reads here.
    verify = sampling & (fast == 0) & (k_on == 0) & p_on & VERIFY
    if sampling & (fast == 0) & (k_on | p_on) & (verify == 0):
        tau = _descent(row, top, k, p, k_on, zmax, safe_t, V, l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s,
                       r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr, PAIRS, BLOCK, NB, LOG2_NB)
    tl.store(zmax_ptr + row, zmax)
    tl.store(greedy_ptr + row, tl.where(count > 0, greedy, -1).to(tl.int64))
    tl.store(cnt_ptr + row, count)
    tl.store(key_ptr + row, tau)
    tl.store(fast_ptr + row, tl.where(fast, drawn, tl.where(verify, VERIFY_ROW, -2)).to(tl.int64))
    tl.store(tries_ptr + row, tries)
