"""The key-tile step the paged decode and prefill kernels share (rast_kernels.paged_attention): one tile of
keys and values, gathered through the block table, folded into an online softmax, with the causal mask,
the sliding window and Gemma 2's score cap."""
from __future__ import annotations

import triton
import triton.language as tl

from rast_kernels.fp8_kv import load_scale
from rast_kernels.layer_ops_numerics import _tanh


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # the interpreter's tl.dot gets bfloat16 wrong (it has no numpy bf16), so it sees float32 there
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _fits(x, dtype: tl.constexpr):
    if dtype == tl.float16:
        x = tl.minimum(tl.maximum(x, -65504.0), 65504.0)
    return x


@triton.jit
def _tile_update(q, m_i, l_i, acc, k_base, v_base, bt_row, n0, end, pos, d, head_dim, stride_cb, stride_cr,
                 scale_log2, window, softcap_log2, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr, FP8: tl.constexpr, COMPILED: tl.constexpr):
    # Folds keys [n0, n0 + BLOCK_N) ∩ [0, end) into the online softmax (m_i, l_i, acc) of the rows of q;
    # k_base, v_base point at the KV head, bt_row at the sequence's block-table row. CAUSAL: row r sees
    # only keys n <= pos[r] too, and with SLIDING only keys n > pos[r] - window (HF's sliding window: the
    # window counts the row's own key). A row that sees no key keeps its state (m_safe keeps -inf from NaN).
    # FP8: a key or value row is its codes times its power-of-two scale, exact in q's dtype, except that
    # fp16 clamps to its largest finite value: a stored 65504 rounds to the code 256 · 2^8 = 65536, which
    # fp16 would hold as inf, and one inf key turns its head's output into NaN.
    n = n0 + tl.arange(0, BLOCK_N)
    n_mask = n < end
    page = tl.load(bt_row + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    off = page * stride_cb + (n % BLOCK_SIZE) * stride_cr
    k_t = tl.load(k_base + off[None, :] + d[:, None], mask=(d < head_dim)[:, None] & n_mask[None, :], other=0.0)
    if FP8:
        scales = load_scale(k_base, page, n % BLOCK_SIZE, stride_cb, stride_cr, head_dim, n_mask, BLOCK_SIZE)
        k_t = _fits(k_t.to(tl.float32) * scales[None, :], q.dtype)
    k_t = k_t.to(q.dtype)  # [D, N]
    s = _mm(q, k_t, PRECISION, UPCAST) * scale_log2
    if SOFTCAP:  # Gemma 2's cap * tanh(score / cap), in the log2 domain: the cap scaled by log2(e) too
        s = softcap_log2 * _tanh(s / softcap_log2, COMPILED)
    if CAUSAL:
        seen = n_mask[None, :] & (n[None, :] <= pos[:, None])
        if SLIDING:
            seen = seen & (n[None, :] > pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
    else:
        s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + off[:, None] + d[None, :], mask=n_mask[:, None] & (d < head_dim)[None, :], other=0.0)
    if FP8:
        scales = load_scale(v_base, page, n % BLOCK_SIZE, stride_cb, stride_cr, head_dim, n_mask, BLOCK_SIZE)
        v = _fits(v.to(tl.float32) * scales[:, None], q.dtype)
    v = v.to(q.dtype)
    return m_new, l_i, acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION, UPCAST)
