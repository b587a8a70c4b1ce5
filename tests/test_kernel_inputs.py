"""Kernel inputs the engine never builds but an embedder may pass: index and metadata tensors that are
strided views (the kernels read them at unit stride, so the launchers must hand them over contiguous),
q and k norm weights of different strides, a cache of another block size, and stale NaN or inf past a
context in a reused block. The oracle for each stride case is the same call on contiguous copies."""
from __future__ import annotations

import pytest
import torch

from rast_engine.attention.metadata import AttentionMetadata
from rast_engine.attention.torch_backend import TorchAttention
from rast_engine.attention.triton_backend import TritonAttention
from rast_kernels.fp8_linear import fp8_linear, quantize_fp8
from rast_kernels.kv_store import store_kv_cache
from rast_kernels.layer_ops import rotary_embedding, rotary_embedding_store_kv
from rast_kernels.paged_attention import paged_decode_attention, paged_prefill_attention


def _column(values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``values`` as column 0 of a [n, 2] tensor: stride 2, with junk beside each entry."""
    return torch.tensor([[x, 7] for x in values], dtype=dtype)[:, 0]


def test_strided_slots_and_positions_read_as_contiguous() -> None:
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(3, 1, 16, generator=gen), torch.randn(3, 1, 16, generator=gen)
    slots = _column([0, 5, 9])
    caches = [[torch.zeros(4, 4, 1, 16) for _ in range(2)] for _ in range(2)]
    store_kv_cache(k, v, *caches[0], slots)
    store_kv_cache(k, v, *caches[1], slots.contiguous())
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    q, kk, cos_sin = torch.randn(3, 2, 16, generator=gen), torch.randn(3, 1, 16, generator=gen), torch.randn(20, 16)
    positions = _column([1, 2, 3])
    for got, want in zip(rotary_embedding(positions, q, kk, cos_sin), rotary_embedding(positions.contiguous(), q, kk,
                                                                                       cos_sin)):
        assert torch.equal(got, want)


def test_fused_store_reads_strided_positions_and_slots_as_contiguous() -> None:
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, h, 16, generator=gen) for h in (2, 1, 1))
    cos_sin = torch.randn(20, 16, generator=gen)
    results = []
    for pos, slot in ((_column([1, 4, 2]), _column([0, 5, 9])), (torch.tensor([1, 4, 2]), torch.tensor([0, 5, 9]))):
        k_cache, v_cache = torch.zeros(4, 4, 1, 16), torch.zeros(4, 4, 1, 16)
        results.append((*rotary_embedding_store_kv(pos, q, k, v, cos_sin, k_cache, v_cache, slot), k_cache, v_cache))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_strided_attention_metadata_reads_as_contiguous() -> None:
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = torch.randn(6, 4, 1, 16, generator=gen), torch.randn(6, 4, 1, 16, generator=gen)
    table = torch.tensor([[1, 3, 5], [2, 4, 0]], dtype=torch.int32)
    columns_apart = table.t().contiguous().t()  # the same entries, adjacent down a column instead of along a row
    ctx = torch.tensor([10, 7], dtype=torch.int32)
    q = torch.randn(2, 2, 16, generator=gen)
    want = paged_decode_attention(q, k_cache, v_cache, table, ctx, 0.25, num_splits=1)
    for t, c, splits in ((columns_apart, ctx, 1), (table, _column([10, 7], torch.int32), 1),
                         (columns_apart, _column([10, 7], torch.int32), 2)):
        torch.testing.assert_close(paged_decode_attention(q, k_cache, v_cache, t, c, 0.25, num_splits=splits), want)
    qp, cu = torch.randn(5, 2, 16, generator=gen), torch.tensor([0, 3, 5], dtype=torch.int32)
    want = paged_prefill_attention(qp, k_cache, v_cache, table, ctx, cu, 3, 0.25)
    got = paged_prefill_attention(qp, k_cache, v_cache, columns_apart, _column([10, 7], torch.int32),
                                  _column([0, 3, 5], torch.int32), 3, 0.25)
    torch.testing.assert_close(got, want)


def test_strided_fp8_scale_and_bias_read_as_contiguous() -> None:
    gen = torch.Generator().manual_seed(2)
    w8, scale = quantize_fp8(torch.randn(8, 16, generator=gen))
    bias, x = torch.randn(8, generator=gen), torch.randn(2, 16, generator=gen)
    strided_scale = torch.stack([scale, torch.full_like(scale, 100.0)], 1)[:, 0]
    strided_bias = torch.stack([bias, torch.full_like(bias, 50.0)], 1)[:, 0]
    got = fp8_linear(x, w8, strided_scale, strided_bias, backend="triton")
    torch.testing.assert_close(got, fp8_linear(x, w8, scale, bias, backend="torch"))


def test_q_and_k_norm_weights_must_share_strides() -> None:
    q, k, cos_sin = torch.randn(4, 2, 16), torch.randn(4, 1, 16), torch.randn(8, 16)
    qw, kw = torch.randn(2, 16), torch.randn(2, 32)[:, :16]  # kw: rows 32 apart
    with pytest.raises(ValueError, match="strides"):
        rotary_embedding(torch.arange(4), q, k, cos_sin, (qw, kw, 1e-6))


def _meta(table: torch.Tensor, ctx: list[int], block_size: int, prefill: bool = False) -> AttentionMetadata:
    n = len(ctx)
    return AttentionMetadata(is_prefill=prefill, slot_mapping=torch.full((n,), -1), block_tables=table,
                             context_lens=torch.tensor(ctx, dtype=torch.int32),
                             cu_seqlens_q=torch.arange(n + 1, dtype=torch.int32), max_seqlen_q=1,
                             max_seqlen_k=max(ctx), block_size=block_size)


@pytest.mark.parametrize("backend", [TorchAttention, TritonAttention])
def test_a_cache_of_another_block_size_is_refused(backend: type) -> None:
    cache = torch.zeros(4, 16, 1, 16)
    q = torch.randn(1, 1, 16)
    with pytest.raises(ValueError, match="block_size"):
        backend().forward(q, q, q, cache, cache.clone(), _meta(torch.tensor([[1]], dtype=torch.int32), [1], 8,
                                                               prefill=True), 0.25)


def test_stale_non_finite_rows_past_a_context_do_not_reach_the_output() -> None:
    """The torch decode reads every row up to the longest context and gives the rest probability 0; a
    NaN or inf left there by an earlier request must contribute 0, not 0 * inf."""
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache = torch.randn(6, 4, 1, 16, generator=gen), torch.randn(6, 4, 1, 16, generator=gen)
    meta = _meta(torch.tensor([[1, 0, 0], [2, 3, 4]], dtype=torch.int32), [3, 10], 4)
    q = torch.randn(2, 2, 16, generator=gen)
    want = TorchAttention().attend(q, None, None, k_cache, v_cache, meta, 0.25)
    k_cache[1, 3], v_cache[1, 3] = float("inf"), float("nan")  # row 3 of sequence 0's block: past its context
    for backend in (TorchAttention(), TritonAttention()):
        torch.testing.assert_close(backend.attend(q, None, None, k_cache, v_cache, meta, 0.25), want)
