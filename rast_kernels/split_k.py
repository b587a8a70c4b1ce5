"""Split-K for paged decode attention: how one sequence's keys are cut among programs, and the reduce
that merges their partial softmax states.

Two levels, so that a CUDA graph captures it with no host sync:
- host, shapes only: ``pick_num_splits`` sets the grid's split count S from the batch, the KV heads and
  the block table's width. The width bounds every context; under CUDA graphs the table is padded to
  max_model_len, so S is the most splits any sequence could use, never a length read from the device.
- device, per sequence: ``split_plan`` cuts the sequence's own context of ctx tokens into at most
  n = min(S, cdiv(ctx, min_tokens)) splits of tps = round_up(cdiv(ctx, n), BLOCK_N) tokens; the splits
  past the context are empty. A long sequence spreads over all S splits, a short one over few, and the
  padded table width changes nothing but S.

Why this rule. A decode step waits for its longest split. With at most n splits the longest holds at
least cdiv(ctx, n * BLOCK_N) tiles, and tps reaches that bound (cdiv(cdiv(ctx, n), BLOCK_N) is the same
number). Rounding tps up to whole tiles keeps every split tile-aligned, so only the context's last
tile is partial; the splits the rounding frees are empty rather than ragged, which writes and reduces
fewer partials at the same latency. The floor min_tokens (MIN_TOKENS_PER_SPLIT) bounds a split's fixed
cost: its q load and the G * (D + 2) float32 partial it writes and the reduce reads back come to 4-8%
of the K/V bytes of 256 tokens (G = 4 to 8 query heads per KV head, D = 128, 16-bit).

Empty splits write nothing: the reduce recomputes the same plan from ctx and reads only the splits
that hold tokens, so a context of 0 (CUDA-graph padding) reads none and yields zeros. A sliding window
cuts the keys a query sees to [max(ctx - window, 0), ctx), and the plan cuts that span instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rast_kernels.launch import cdiv, sm_count

MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost (q load, partial write) dominates
MAX_SPLITS = 64


@triton.jit
def split_plan(ctx, num_splits, min_tokens, BLOCK_N: tl.constexpr):
    """(tokens per split, splits that hold tokens) for a context of ctx tokens: (0, 0) when ctx is 0."""
    n = tl.maximum(tl.minimum((ctx + min_tokens - 1) // min_tokens, num_splits), 1)
    tps = ((ctx + n - 1) // n + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    tile_aligned = tl.maximum(tps, BLOCK_N)  # tps is 0 only when ctx is
    return tps, (ctx + tile_aligned - 1) // tile_aligned


@triton.jit
def window_start(ctx, window, SLIDING: tl.constexpr):
    """The first key a query at position ctx - 1 sees: 0, or with a sliding window ctx - window."""
    if SLIDING:
        return tl.maximum(ctx - window, 0)
    return ctx * 0


def check_attention_options(window: int | None, softcap: float | None) -> None:
    """A sliding window's and a score cap's values (None: none)."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or
                                not 0 < softcap < float("inf")):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")


@triton.jit
def split_reduce_kernel(pm_ptr, pl_ptr, pacc_ptr, ctx_ptr, out_ptr, stride_ob, stride_oh, num_heads, head_dim,
                        num_splits, min_tokens, window, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, SLIDING: tl.constexpr):
    # out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the splits holding tokens, M = max m_s
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b)
    _, used = split_plan(ctx - window_start(ctx, window, SLIDING), num_splits, min_tokens, BLOCK_N)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < used
    row = (b * num_heads + h) * num_splits + s
    m = tl.load(pm_ptr + row, mask=s_mask, other=float("-inf"))
    l = tl.load(pl_ptr + row, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # unread splits (m = -inf) weigh 0
    total = tl.sum(w * l, 0)
    acc = tl.load(pacc_ptr + row[:, None] * head_dim + d[None, :],
                  mask=s_mask[:, None] & (d < head_dim)[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < head_dim)


def pick_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device,
                    min_tokens: int = MIN_TOKENS_PER_SPLIT) -> int:
    """Splits so that batch * Hkv * splits fills about two waves of SMs when every sequence is as long
    as ``max_context`` (the table width); each sequence then uses as many as its own length allows."""
    programs = max(batch * num_kv_heads, 1)
    want = cdiv(2 * sm_count(device), programs)
    return max(1, min(want, cdiv(max_context, min_tokens), MAX_SPLITS))
