"""The vocabulary-split kernels of the Triton sampler: the one read of the inputs (``_stats``, which also
keeps each chunk's candidates) and the fallback draw (``_draw``, ``_write_probs``; the per-row
``_finish`` is in rast_kernels.sampler_triton_finish).
The algorithm and its exactness argument are in rast_kernels.sampler_triton; the device functions they
share, in rast_kernels.sampler_triton_common."""
from __future__ import annotations

import triton
import triton.language as tl

from rast_kernels.sampler_triton_common import BIG, TINY, _clamp, _gumbel_score, _param, _row_key, _z, _zkey

EVICT_STEPS = tl.constexpr(12)  # bisection steps of a candidate-floor search (_evict)


@triton.jit
def _evict(cid_ptr, cz_ptr, base, taken, zk, cand, m_new, safe_t, target, CAP: tl.constexpr):
    """Make room in a chunk's candidate list: the new floor is the smallest key t such that at most
    ``target`` of (stored candidates, this block's ``cand``) have key >= t. Stored ones below it are
    compacted away and returned as (max z, sum exp((z - m_new)/T)) for the non-candidate summary."""
    tl.debug_barrier()  # earlier stores of this program are visible to all its threads
    slot = tl.arange(0, CAP)
    stored = slot < taken
    # only the keys stay live through the bisection; z and ids are read again for the compaction
    sk = tl.where(stored, _zkey(tl.load(cz_ptr + base + slot, mask=stored, other=float("-inf"))), 2147483647)
    nk = tl.where(cand, zk, 2147483647)
    lo = tl.minimum(tl.min(sk, axis=0), tl.min(nk, axis=0)).to(tl.int64)  # everything: > target
    sk = tl.where(stored, sk, -2147483648)  # absent entries sit below every real key
    nk = tl.where(cand, nk, -2147483648)
    hi = tl.maximum(tl.max(sk, axis=0), tl.max(nk, axis=0)).to(tl.int64) + 1  # nothing: <= target
    # Bisection keeps count(key >= hi) <= target; EVICT_STEPS halvings leave hi within 2**-EVICT_STEPS
    # of the key range above the true floor, which only costs a few more evictions.
    for _ in range(EVICT_STEPS):
        mid = lo + (hi - lo) // 2
        fits = tl.sum((sk >= mid).to(tl.int32), axis=0) + tl.sum((nk >= mid).to(tl.int32), axis=0) <= target
        go = lo < hi
        lo = tl.where(go & ~fits, mid + 1, lo)
        hi = tl.where(go & fits, mid, hi)
    floor = hi.to(tl.int32)
    keep = stored & (sk >= floor)
    gone = stored & (sk < floor)
    sz = tl.load(cz_ptr + base + slot, mask=stored, other=float("-inf"))
    sid = tl.load(cid_ptr + base + slot, mask=stored, other=0)
    pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.debug_barrier()  # every thread has read the list before any slot is overwritten
    tl.store(cid_ptr + base + pos, sid, mask=keep)
    tl.store(cz_ptr + base + pos, sz, mask=keep)
    gone_max = tl.max(tl.where(gone, sz, float("-inf")), axis=0)
    gone_sum = tl.sum(tl.where(gone, tl.exp((sz - m_new) / safe_t), 0.0), axis=0)
    return floor, tl.sum(keep.to(tl.int32), axis=0), gone_max, gone_sum


@triton.jit
def _margin(temp, top_k, top_p, min_p, V, WIDE: tl.constexpr):
    """The row's candidate margin in z units (d-space nats times T): -log(min_p) + 0.5 nats for min-p
    without top-k, else WIDE; -1 (no candidates) for greedy rows and rows without any filter."""
    k_on = (top_k > 0) & (top_k < V)
    nats = tl.where((min_p > 0) & ~k_on, 0.5 - tl.log(tl.maximum(min_p, 1e-30)), WIDE)
    filtered = k_on | (top_p < 1.0) | (min_p > 0)
    return tl.where(filtered & (temp > 0), nats * temp, -1.0)


@triton.jit
def _stats(l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr,
           temp_ptr, temp_v, topk_ptr, topk_v, topp_ptr, topp_v, minp_ptr, minp_v, seed_ptr, seed_v, offset_ptr,
           offset_v, pf_ptr, pk_ptr, pi_ptr, smax_ptr, sidx_ptr, smin_ptr, scnt_ptr, cid_ptr, cz_ptr, ccnt_ptr,
           ncmax_ptr, ncsum_ptr, V, CHUNK, S, PAIRS: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr,
           WIDE: tl.constexpr, ROWS: tl.constexpr):
    """Per chunk: max z (first index), min z, finite count, and up to CAP candidates stored exactly
    (id, z): finite tokens with z >= running max - margin and key >= a floor that rises whenever the
    list would overflow (``_evict`` keeps the best 3/4, or all CAP in the chunk's last block). Every
    other finite token is a non-candidate, summarised by its max z and sum exp(-(m - z)/T) (m: the
    chunk max). Invariant: each finite token of the chunk is stored or summarised, never both.
    The row's parameters come raw (bit i of ROWS: parameter i is a tensor, else a scalar argument) and
    are clamped here; the chunk-0 program writes them to pf [temperature, top_p, min_p], pk [top_k] and
    pi [seed, offset] (each [3|1|2, B]), where the later kernels read them."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    lanes = tl.arange(0, BLOCK)
    out = row * S + split
    base = out * CAP
    temp = _param(temp_ptr, row, temp_v, ROWS & 1, tl.float32)
    top_k = _param(topk_ptr, row, topk_v, (ROWS >> 1) & 1, tl.int32)
    top_p = _param(topp_ptr, row, topp_v, (ROWS >> 2) & 1, tl.float32)
    min_p = _param(minp_ptr, row, minp_v, (ROWS >> 3) & 1, tl.float32)
    # a NaN parameter empties the row (the spec); tested before clamping, which may map NaN to a bound
    valid = (temp == temp) & (top_p == top_p) & (min_p == min_p)
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
    safe_t = tl.where(temp > 0, temp, 1.0)
    margin = _margin(temp, top_k, top_p, min_p, V, WIDE)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK], BIG, tl.int32)
    low = tl.full([BLOCK], float("inf"), tl.float32)
    cnt = tl.zeros([BLOCK], tl.int32)
    m_run = float("-inf")
    nc_max = float("-inf")
    nc_sum = 0.0
    taken = 0
    floor = tl.full([], -2147483648, tl.int32)  # below every real key
    end = tl.minimum(split * CHUNK + CHUNK, V)
    for start in range(split * CHUNK, end, BLOCK):
        offs = start + lanes
        mask = offs < V
        z = _z(row, offs, mask, l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s,
               r3, r3s, b3, b3s, w_ptr, PAIRS)
        z = tl.where(valid, z, float("nan"))
        ok = mask & (tl.abs(z) < float("inf"))  # false for NaN and +-inf
        better = ok & (z > best)  # strict: each lane sees increasing ids, so it keeps the first max
        best_i = tl.where(better, offs, best_i)
        best = tl.where(better, z, best)
        low = tl.where(ok, tl.minimum(low, z), low)
        cnt += ok.to(tl.int32)
        m_new = tl.maximum(m_run, tl.max(tl.where(ok, z, float("-inf")), axis=0))
        nc_sum = nc_sum * tl.where(m_new == m_run, 1.0, tl.exp((m_run - m_new) / safe_t))  # both -inf: no NaN
        zk = _zkey(z)
        cand = ok & (z >= m_new - margin) & (zk >= floor)
        if taken + tl.sum(cand.to(tl.int32), axis=0) > CAP:
            target = tl.where(start + BLOCK >= end, CAP, CAP - CAP // 4)
            floor, taken, gone_max, gone_sum = _evict(cid_ptr, cz_ptr, base, taken, zk, cand, m_new, safe_t,
                                                      target, CAP)
            nc_max = tl.maximum(nc_max, gone_max)
            nc_sum += gone_sum
            cand = cand & (zk >= floor)
        pos = taken + tl.cumsum(cand.to(tl.int32), axis=0) - 1
        keep = cand & (pos < CAP)  # always true after _evict; kept so no store can leave the list
        tl.store(cid_ptr + base + pos, offs, mask=keep)
        tl.store(cz_ptr + base + pos, z, mask=keep)
        taken += tl.sum(keep.to(tl.int32), axis=0)
        spill = ok & (~keep)  # non-candidates, including tokens below the floor
        nc_max = tl.maximum(nc_max, tl.max(tl.where(spill, z, float("-inf")), axis=0))
        nc_sum += tl.sum(tl.where(spill, tl.exp((z - m_new) / safe_t), 0.0), axis=0)
        m_run = m_new
    m = tl.max(best, axis=0)
    tl.store(smax_ptr + out, m)
    tl.store(sidx_ptr + out, tl.min(tl.where(best == m, best_i, BIG), axis=0))
    tl.store(smin_ptr + out, tl.min(low, axis=0))
    tl.store(scnt_ptr + out, tl.sum(cnt, axis=0))
    tl.store(ccnt_ptr + out, taken)
    tl.store(ncmax_ptr + out, nc_max)
    tl.store(ncsum_ptr + out, nc_sum)


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
def _scan_draw(row, begin, end, zmax, temp, top, min_p, rkey, l_ptr, l_stride,
               r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr,
               PAIRS: tl.constexpr, BLOCK: tl.constexpr):
    """Per lane over tokens [begin, end): the best Gumbel score over A, its id, and the lane's second
    best score (a tie with the best counts as second best, so the bound it gives stays strict)."""
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    second = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK], BIG, tl.int32)
    for start in range(begin, end, BLOCK):
        offs = start + lanes
        mask = offs < end
        ok, d, w = _admissible(row, offs, mask, zmax, temp, top, min_p, l_ptr, l_stride,
                               r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s,
                               w_ptr, PAIRS)
        score = tl.where(ok, _gumbel_score(offs, rkey, d), float("-inf"))
        better = score > best  # strict: lanes see increasing ids, so ties keep the lowest
        second = tl.where(better, best, tl.maximum(second, score))
        best_i = tl.where(better, offs, best_i)
        best = tl.where(better, score, best)
    return best, best_i, second


@triton.jit
def _top_draws(score, ids, M: tl.constexpr):
    """The M best (score, id) pairs in draw order (score descending, lowest id first on ties), and the
    best score left outside them. Ids are unique (each token is scored once), so removing a pair by id
    removes that pair alone."""
    order = tl.arange(0, M)
    tops = tl.full([M], float("-inf"), tl.float32)
    top_ids = tl.full([M], BIG, tl.int32)
    for m in tl.static_range(M):
        best = tl.max(score, axis=0)
        i = tl.min(tl.where(score == best, ids, BIG), axis=0)
        tops = tl.where(order == m, best, tops)
        top_ids = tl.where(order == m, i, top_ids)
        score = tl.where(ids == i, float("-inf"), score)
    return tops, top_ids, tl.max(score, axis=0)


@triton.jit
def _lane_top(best, best_i, second, out, cscore_ptr, cidx_ptr, cbound_ptr, M: tl.constexpr):
    """Stores the M best lane winners (_top_draws) and a bound that no other token of the scan beats:
    the best remaining lane winner or any lane's second best."""
    tops, top_ids, rest = _top_draws(best, best_i, M)
    slots = out * M + tl.arange(0, M)
    tl.store(cscore_ptr + slots, tops)
    tl.store(cidx_ptr + slots, top_ids)
    tl.store(cbound_ptr + out, tl.maximum(rest, tl.max(second, axis=0)))


@triton.jit
def _draw(l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr,
          temp_ptr, minp_ptr, seed_ptr, offset_ptr, zmax_ptr, key_ptr, cnt_ptr, fast_ptr, cscore_ptr, cidx_ptr,
          cbound_ptr, V, CHUNK, S, SUM_MASS: tl.constexpr, PAIRS: tl.constexpr, BLOCK: tl.constexpr,
          M: tl.constexpr):
    """Per chunk: the M best Gumbel scores over A with their ids and the chunk's bound (_lane_top), or
    (SUM_MASS) the sum of w over A. Rows already drawn from their candidates (fast >= 0) are skipped
    without reading the row."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    out = row * S + split
    temp = tl.load(temp_ptr + row)
    todo = (temp > 0) & (tl.load(cnt_ptr + row) > 0)
    if not SUM_MASS:
        todo = todo & (tl.load(fast_ptr + row) < 0)
    begin = split * CHUNK
    end = tl.minimum(begin + CHUNK, V)
    if todo:
        zmax = tl.load(zmax_ptr + row)
        top = tl.load(key_ptr + row)
        min_p = tl.load(minp_ptr + row)
        if SUM_MASS:
            total = tl.zeros([BLOCK], tl.float32)
            for start in range(begin, end, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                ok, d, w = _admissible(row, offs, offs < end, zmax, temp, top, min_p, l_ptr, l_stride,
                                       r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s,
                                       w_ptr, PAIRS)
                total += tl.where(ok, w, 0.0)
            tl.store(cscore_ptr + out, tl.sum(total, axis=0))
        else:
            rkey = _row_key(tl.load(seed_ptr + row), tl.load(offset_ptr + row))
            best, best_i, second = _scan_draw(row, begin, end, zmax, temp, top, min_p, rkey, l_ptr, l_stride,
                                              r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s,
                                              w_ptr, PAIRS, BLOCK)
            _lane_top(best, best_i, second, out, cscore_ptr, cidx_ptr, cbound_ptr, M)
    elif SUM_MASS:
        tl.store(cscore_ptr + out, 0.0)
    else:  # nothing to draw: the same empty list a row without admissible tokens leaves
        tl.store(cscore_ptr + out * M + tl.arange(0, M), tl.full([M], float("-inf"), tl.float32))
        tl.store(cidx_ptr + out * M + tl.arange(0, M), tl.full([M], BIG, tl.int32))
        tl.store(cbound_ptr + out, float("-inf"))


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
