"""The vocabulary-split kernels of the Triton sampler that read a row again after ``_select``: the draw
(``_draw``) and probs()'s output (``_write_probs``). The one read of the inputs, ``_stats``, is in
rast_kernels.sampler_triton_stats; the per-row ``_finish``, in rast_kernels.sampler_triton_finish.
The algorithm and its exactness argument are in rast_kernels.sampler_triton; the device functions they
share, in rast_kernels.sampler_triton_common."""
from __future__ import annotations

import triton
import triton.language as tl

from rast_kernels.sampler_triton_common import BIG, _gumbel_score, _row_key, _z


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
