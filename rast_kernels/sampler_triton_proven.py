"""The candidate tile's searches for ``_select`` (rast_kernels.sampler_triton_select): the k-th smallest
key of the candidates (``_kth_key``), and the proven draw (``_proven_draw``), which draws first and checks
the draw against the filters as their threshold searches would decide it, without running them. Keys are
``_zkey`` order keys of d = (zmax - z) / T, so a smaller key is a more probable token."""
from __future__ import annotations

import triton
import triton.language as tl

from rast_kernels.sampler_triton_common import BIG, _zkey

# bounds on a float32 sum of at most SP * CAP positive terms, as another reduction order would round it: its
# relative error is below 2^-17 or so (a tree of depth <= 16 plus a thread's own terms), far inside 2^-10
SUM_LOW = tl.constexpr(1.0 - 2.0**-10)
SUM_HIGH = tl.constexpr(1.0 + 2.0**-10)
NO_RANK = tl.constexpr(-(2**63))  # _proven_draw's rank of a slot it cannot draw


@triton.jit
def _kth_key(ck, in_u, k, tau):
    """The k-th smallest key of U (1 <= k <= |U|; tau: U's largest key) by a ternary search: a round
    counts the keys <= two pivots at once, both counts in one int32 (a count is at most the tile's
    SP * CAP < 2^16 slots), so it costs one block-wide reduction and cuts [lo, hi] to a third where a
    bisection round halved it. It stops once exactly k keys are <= a pivot; otherwise lo converges on
    the smallest t with k keys <= t, which is the k-th smallest key."""
    lo = 0
    hi = tau
    while lo < hi:
        m1 = lo + (hi - lo) // 3
        m2 = m1 + (hi - m1) // 2  # lo <= m1 <= m2 < hi: every round narrows [lo, hi]
        both = tl.sum(tl.where(in_u, (ck <= m1).to(tl.int32) + ((ck <= m2).to(tl.int32) << 16), 0), axis=0)
        c1 = both & 0xFFFF
        c2 = both >> 16
        # the k-th key lies in [lo, m1] if c1 >= k (it is m1's largest if c1 == k), else in (m1, m2] if c2 >= k
        above_m1 = tl.where(c2 >= k, tl.where(c2 == k, m2, m1 + 1), m2 + 1)
        lo, hi = (tl.where(c1 >= k, tl.where(c1 == k, m1, lo), above_m1),
                  tl.where(c1 >= k, m1, tl.where(c2 >= k, m2, hi)))
    # k keys <= lo: the k-th is the largest of them (lo itself when the search ran to the end)
    return tl.max(tl.where(in_u & (ck <= lo), ck, 0), axis=0)


@triton.jit
def _largest(ck, in_u):
    """The largest key of U (0 when U is empty): where a search of the threshold starts."""
    return tl.max(tl.where(in_u, ck, 0), axis=0)


@triton.jit
def _best(score, cid):
    """The id with the highest score, the lowest id on ties (score -inf off the set drawn from)."""
    top = tl.max(score, axis=0)
    return tl.min(tl.where(score == top, cid, BIG), axis=0)


@triton.jit
def _proven_draw(score, cid, ck, w, in_u, k, limit, k_check, p_check, kp_check, p, mass_u, TRIES: tl.constexpr):
    """(the draw over A, tries) or (-1, 0) when TRIES draws prove nothing. Each try takes the best score x
    left (-inf off the set: U within top-k's key when it is known, min-p applied) and checks the filter
    that is left, as its threshold search would decide it, without searching: top-k alone keeps x iff
    fewer than k keys of U lie below x's (tau is the k-th smallest key); top-p keeps x iff its key is 0 or
    the mass of U below its key is < limit (the bisection's own sum and test, monotone in the key). A
    kept x is the best score over A, since A lies within the set. A rejected x rejects every key >= its
    own, so the next try draws from the rest. With top_p = 0.95 the first try fails with probability
    about 0.05, where the search takes up to 31 block-wide reductions; a try takes three.

    kp_check: top-k with top-p before the top-k search, so limit = top_p * Z_K is not known. Z_K is
    bounded instead: if fewer than k keys lie below x's, every key <= x's is within top-k, so
    mass(U, key < kx) + w_x <= Z_K; and Z_K <= mass(U) (mass_u: top-k lies within U). x is kept when the
    mass below it is under top_p times the lower bound, rejected when it is at least top_p times the
    upper bound or x is outside top-k, each with SUM_LOW / SUM_HIGH's slack for the rounding of Z_K's own
    sum; in between the draws stop undecided and the row searches top-k. A try then takes four."""
    # (score, -id) as one int64, so one max finds the best score and, on ties, the lowest id; scores are
    # keyed in order, -0.0 as +0.0 (they compare equal); slots off the set rank below every candidate
    ranked = (_zkey(tl.where(score == 0.0, 0.0, score)).to(tl.int64) << 32) | (BIG - cid.to(tl.int64))
    ranked = tl.where(score > float("-inf"), ranked, NO_RANK)
    bound = BIG  # the slots left have keys < bound: a rejected x rejects every key >= its own
    drawn = -1
    tries = 0
    undecided = tries < 0
    while (drawn < 0) & (tries < TRIES) & (undecided == 0):
        tries += 1
        best = tl.max(tl.where(ck < bound, ranked, NO_RANK), axis=0)
        x = -best.to(tl.int32) + BIG
        kx = tl.max(tl.where((cid == x) & (ranked > NO_RANK) & (ck < bound), ck, -1), axis=0)
        before = in_u & (ck < kx)
        kept = kx >= 0
        n_before = 0
        if k_check | kp_check:
            n_before = tl.sum(before.to(tl.int32), axis=0)
        m_before = 0.0
        if p_check | kp_check:
            m_before = tl.sum(tl.where(before, w, 0.0), axis=0)
        if k_check:
            kept = kept & (n_before < k)
        if p_check:
            kept = kept & ((kx == 0) | (m_before < limit))
        if kp_check:
            w_x = tl.exp(-kx.to(tl.float32, bitcast=True))  # x's own w: the same d, the same exp
            in_k = n_before < k
            sure_in = in_k & ((kx == 0) | (m_before < p * ((m_before + w_x) * SUM_LOW)))
            sure_out = (in_k == 0) | ((kx != 0) & (m_before >= p * (mass_u * SUM_HIGH)))
            kept = kept & sure_in
            undecided = (kx >= 0) & (sure_in == 0) & (sure_out == 0)
        drawn = tl.where(kept, x, -1)
        bound = tl.where(kept, bound, kx)
    return drawn, tl.where(drawn >= 0, tries, 0)
