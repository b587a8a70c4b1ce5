"""The last kernel of the Triton sampler, ``_finish`` (grid B): it reduces the chunk draws and, for rows
whose top-p threshold was never searched (``VERIFY_ROW``), proves that the best draw lies in A, with
one read of the row, before falling back to the full-row search. The algorithm and its exactness
argument are in rast_kernels.sampler_triton."""
from __future__ import annotations

import triton
import triton.language as tl

from rast_kernels.sampler_triton_common import BIG, _row_key, _z
from rast_kernels.sampler_triton_kernels import _scan_draw, _top_draws
from rast_kernels.sampler_triton_select import VERIFY_ROW, _descent


@triton.jit
def _verified(row, tops, top_ids, bound, zmax, temp, top_p, V, l_ptr, l_stride,
              r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr,
              PAIRS: tl.constexpr, BLOCK: tl.constexpr, M: tl.constexpr):
    """The draw over A, or -1 when these M draws cannot prove it. Draw m is in A iff the mass of the
    tokens with a smaller key is < top_p * Z (tau's definition; the mass grows with the key). Every
    token scoring above ``bound`` is among the draws, so the first draw in A whose score beats the
    bound is the best score over A: the token the full-row search would draw."""
    order = tl.arange(0, M)
    listed = top_ids < V
    tz = _z(row, top_ids, listed, l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s,
            r3, r3s, b3, b3s, w_ptr, PAIRS)
    tkey = tl.where(listed, tl.math.div_rn(zmax - tz, temp).to(tl.int32, bitcast=True), -1)[None, :]
    lanes = tl.arange(0, BLOCK)[:, None]  # lane-local partials, reduced once after the loop (_histogram)
    below = tl.zeros([BLOCK, M], tl.float32)
    total = tl.zeros([BLOCK, 1], tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + lanes
        mask = offs < V
        z = _z(row, offs, mask, l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s,
               r3, r3s, b3, b3s, w_ptr, PAIRS)
        d = tl.math.div_rn(zmax - z, temp)  # the same d, bit for bit, as every other kernel
        w = tl.where(mask & (tl.abs(z) < float("inf")), tl.exp(-d), 0.0)
        total += w
        below += tl.where(d.to(tl.int32, bitcast=True) < tkey, w, 0.0)
    member = tl.sum(below, axis=0) < top_p * tl.sum(total, axis=0)
    first = tl.min(tl.where(member & (tops > bound), order, M), axis=0)
    return tl.max(tl.where(order == first, top_ids, -1), axis=0)


@triton.jit
def _finish(l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr,
            temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr, offset_ptr, zmax_ptr, key_ptr, greedy_ptr, cnt_ptr,
            fast_ptr, cscore_ptr, cidx_ptr, cbound_ptr, out_ptr, path_ptr, V, S, PAIRS: tl.constexpr,
            SP: tl.constexpr, M: tl.constexpr, BLOCK: tl.constexpr, HIST_BLOCK: tl.constexpr, NB: tl.constexpr,
            LOG2_NB: tl.constexpr):
    """Greedy rows take the mode, empty rows -1, fast rows their candidate draw, rows with a known
    threshold the best of the chunk draws; VERIFY_ROW rows the first draw proven to lie in A, else
    (rarely: a small top_p, or near-tied scores) the full-row search and a draw over the row here.
    path: 2 candidates, 1 verified draw, 0 anything else."""
    row = tl.program_id(0)
    parts = tl.arange(0, SP)
    at = row * S * M + parts * M  # chunk c's list at c * M, as _draw stores it: its best draw first
    score = tl.load(cscore_ptr + at, mask=parts < S, other=float("-inf"))
    best = tl.max(score, axis=0)
    idx = tl.min(tl.where(score == best, tl.load(cidx_ptr + at, mask=parts < S, other=BIG), BIG), axis=0)
    drawn = tl.where(idx == BIG, -1, idx)
    fast = tl.load(fast_ptr + row)
    temp = tl.load(temp_ptr + row)
    count = tl.load(cnt_ptr + row)
    path = tl.where(fast >= 0, 2, 0)
    if (fast == VERIFY_ROW) & (temp > 0) & (count > 0):
        slot = tl.arange(0, SP * M)
        listed = slot < S * M
        draws = tl.load(cscore_ptr + row * S * M + slot, mask=listed, other=float("-inf"))
        ids = tl.load(cidx_ptr + row * S * M + slot, mask=listed, other=BIG)
        chunk_bound = tl.max(tl.load(cbound_ptr + row * S + parts, mask=parts < S, other=float("-inf")), axis=0)
        tops, top_ids, rest = _top_draws(draws, ids, M)  # the row's best draws over its chunk lists
        zmax = tl.load(zmax_ptr + row)
        top_p = tl.load(topp_ptr + row)
        drawn = _verified(row, tops, top_ids, tl.maximum(chunk_bound, rest), zmax, temp, top_p, V, l_ptr, l_stride,
                          r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s, w_ptr,
                          PAIRS, BLOCK, M)
        path = tl.where(drawn >= 0, 1, 0)
        if drawn < 0:
            k = tl.load(topk_ptr + row)
            tau = _descent(row, tl.load(key_ptr + row), k, top_p, (k > 0) & (k < count), zmax, temp, V,
                           l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s, b2, b2s, r3, r3s, b3, b3s,
                           w_ptr, PAIRS, HIST_BLOCK, NB, LOG2_NB)
            rkey = _row_key(tl.load(seed_ptr + row), tl.load(offset_ptr + row))
            lane_best, lane_i, _ = _scan_draw(row, 0, V, zmax, temp, tau, tl.load(minp_ptr + row), rkey,
                                              l_ptr, l_stride, r0, r0s, b0, b0s, r1, r1s, b1, b1s, r2, r2s,
                                              b2, b2s, r3, r3s, b3, b3s, w_ptr, PAIRS, BLOCK)
            top = tl.max(lane_best, axis=0)
            drawn = tl.min(tl.where(lane_best == top, lane_i, BIG), axis=0)
            drawn = tl.where(drawn == BIG, -1, drawn)
    drawn = tl.where(fast >= 0, fast, drawn.to(tl.int64))
    drawn = tl.where(count > 0, drawn, -1)
    tl.store(out_ptr + row, tl.where(temp > 0, drawn, tl.load(greedy_ptr + row)))
    tl.store(path_ptr + row, tl.where(temp > 0, path, 0).to(tl.int64))
