"""The engine's attention backends (engine/attention/) against each other and the paged-attention oracle
of test_paged_attention.py: the torch reference backend's batched decode against the oracle, the
Triton backend (interpreted without CUDA) and FlashAttention against the torch backend, and the
FlashAttention glue on a plain-torch stand-in with flash_attn's documented semantics, so CI checks it
without flash_attn."""
from __future__ import annotations

import pytest
import torch

from test_paged_attention import CASES, TOL, gather, oracle, paged, rand


def _metadata(prefix: list[int], new: list[int], bs: int, device: str):
    from rast_engine.attention.metadata import AttentionMetadata

    lens = [p + n for p, n in zip(prefix, new)]
    table, num_blocks = paged(lens, bs, spare=1, seed=5)
    slots = [int(table[b, j // bs]) * bs + j % bs for b, (p, n) in enumerate(zip(prefix, new)) for j in range(p, p + n)]
    cu = torch.tensor([0] + new).cumsum(0).to(torch.int32)
    meta = AttentionMetadata(
        is_prefill=max(new) > 1 or sum(prefix) == 0, slot_mapping=torch.tensor(slots, device=device),
        block_tables=table.to(device), context_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        cu_seqlens_q=cu.to(device), max_seqlen_q=max(new), max_seqlen_k=max(lens), block_size=bs)
    return meta, num_blocks


def _compare_backends(backend, device: str, dtype: torch.dtype, prefix: list[int], new: list[int],
                      bs: int = 4, window: int | None = None, softcap: float | None = None) -> None:
    from rast_engine.attention.torch_backend import TorchAttention

    hq, hkv, dim = 4, 2, 16
    meta, num_blocks = _metadata(prefix, new, bs, device)
    g = torch.Generator().manual_seed(7)
    caches = [rand(num_blocks, bs, hkv, dim, dtype=dtype, device=device, g=g) for _ in range(2)]
    t = sum(new)
    q, k, v = (rand(t, h, dim, dtype=dtype, device=device, g=g) for h in (hq, hkv, hkv))
    got_k, got_v = caches[0].clone(), caches[1].clone()
    got = backend.forward(q, k, v, got_k, got_v, meta, 0.25, window, softcap)
    want = TorchAttention().forward(q, k, v, caches[0], caches[1], meta, 0.25, window, softcap)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    torch.testing.assert_close(got_k, caches[0], atol=0, rtol=0)
    torch.testing.assert_close(got_v, caches[1], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_decodes_the_whole_batch_as_the_oracle(dtype: torch.dtype) -> None:
    """The reference backend's batched decode (keys read up to the longest context, the rest masked)
    against the per-sequence oracle: GQA, shuffled blocks, a table wider than any context, and a
    context-0 row (a padded batch row) that must come out as zeros."""
    from rast_engine.attention.metadata import AttentionMetadata
    from rast_engine.attention.torch_backend import TorchAttention

    bs, hq, hkv, dim = 4, 6, 2, 16
    lens = [9, 1, 0, 14]
    table, num_blocks = paged([max(n, 1) for n in lens], bs, spare=3, seed=11)
    table = torch.cat([table, torch.zeros(len(lens), 3, dtype=torch.int32)], dim=1)
    g = torch.Generator().manual_seed(12)
    k_cache, v_cache = (rand(num_blocks, bs, hkv, dim, dtype=dtype, device="cpu", g=g) for _ in range(2))
    q = rand(len(lens), hq, dim, dtype=dtype, device="cpu", g=g)
    meta = AttentionMetadata(is_prefill=False, slot_mapping=torch.full((len(lens),), -1),
                             block_tables=table, context_lens=torch.tensor(lens, dtype=torch.int32),
                             cu_seqlens_q=torch.arange(len(lens) + 1, dtype=torch.int32), max_seqlen_q=1,
                             max_seqlen_k=64, block_size=bs)
    got = TorchAttention().attend(q, q, q, k_cache, v_cache, meta, 0.3)
    want = oracle(q, [gather(k_cache, table[b], n) for b, n in enumerate(lens)],
                  [gather(v_cache, table[b], n) for b, n in enumerate(lens)], [1] * len(lens), 0.3)
    torch.testing.assert_close(got.float(), want, **TOL[dtype])
    assert not got[2].any()


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("prefix,new", [([0, 0], [7, 12]), ([9, 0], [4, 6]), ([13, 30], [1, 1])])
def test_triton_backend_equals_torch_backend(device: str, dtype: torch.dtype, prefix: list[int],
                                             new: list[int]) -> None:
    pytest.importorskip("rast_engine.attention.torch_backend")
    from rast_engine.attention.triton_backend import TritonAttention

    _compare_backends(TritonAttention(num_splits=2 if max(new) == 1 else None), device, dtype, prefix, new)


@pytest.mark.gpu
@pytest.mark.parametrize("prefix,new", [([0, 0], [7, 12]), ([9, 0], [4, 6]), ([13, 30], [1, 1])])
def test_flash_backend_equals_torch_backend(prefix: list[int], new: list[int]) -> None:
    pytest.importorskip("flash_attn")
    pytest.importorskip("rast_engine.attention.torch_backend")
    from rast_engine.attention.flash_backend import FlashAttention

    _compare_backends(FlashAttention(), "cuda", torch.bfloat16, prefix, new, bs=256)


class FlashSemantics:
    """flash_attn's two entry points as documented, in plain torch: the causal mask is aligned to the
    bottom-right corner (query row j of Lq sees keys up to j + Lk - Lq), and window_size (left, right)
    with left >= 0 hides keys before j + Lk - Lq - left; rows that see nothing give 0."""

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                window_size: tuple[int, int], softcap: float) -> torch.Tensor:
        lq, lk, group = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
        k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
        s = torch.einsum("lhd,nhd->hln", q.float(), k) * scale
        if softcap > 0:  # flash_attn's 0 is no cap
            s = softcap * torch.tanh(s / softcap)
        key, edge = torch.arange(lk)[None, :], torch.arange(lq)[:, None] + lk - lq
        hidden = key > edge
        if window_size[0] >= 0:
            hidden |= key < edge - window_size[0]
        s = s.masked_fill(hidden, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1))
        return torch.einsum("hln,nhd->lhd", p, v).to(q.dtype)

    def flash_attn_varlen_func(self, q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_size=(-1, -1),
                               softcap=0.0):
        assert causal and window_size[1] in (-1, 0)
        cq, ck = cu_q.tolist(), cu_k.tolist()
        return torch.cat([self._attend(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], softmax_scale,
                                       window_size, softcap) for b in range(len(cq) - 1)])

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal,
                                window_size=(-1, -1), softcap=0.0):
        assert causal and window_size[1] in (-1, 0)
        out = [self._attend(q[b], gather(k_cache, block_table[b], n), gather(v_cache, block_table[b], n),
                            softmax_scale, window_size, softcap) for b, n in enumerate(cache_seqlens.tolist())]
        return torch.stack(out)


@pytest.mark.parametrize("window,softcap", [(None, None), (1, None), (5, None), (None, 2.0), (5, 2.0)])
@pytest.mark.parametrize("prefix,new", [([0, 0], [7, 12]), ([9, 0, 3], [4, 6, 1]), ([13, 30], [1, 1])])
def test_flash_backend_glue_on_flash_semantics(prefix: list[int], new: list[int], window: int | None,
                                               softcap: float | None) -> None:
    """The right-aligned padding for prefix prefill, the decode/varlen dispatch, and the sliding window's and
    soft cap's translation into flash_attn's window_size and softcap, without flash_attn."""
    pytest.importorskip("rast_engine.attention.torch_backend")
    from rast_engine.attention.flash_backend import FlashAttention

    _compare_backends(FlashAttention(FlashSemantics()), "cpu", torch.float32, prefix, new, window=window,
                      softcap=softcap)


def test_flash_backend_refuses_a_cache_of_another_block_size() -> None:
    """Slots index blocks of the metadata's block_size, so a store into a cache of another block size
    lands in the wrong rows: forward refuses it before writing anything, as the other backends do."""
    from rast_engine.attention.flash_backend import FlashAttention

    meta, num_blocks = _metadata([0], [3], 4, "cpu")
    k_cache, v_cache = torch.zeros(num_blocks, 8, 1, 16), torch.zeros(num_blocks, 8, 1, 16)
    q = torch.randn(3, 1, 16)
    with pytest.raises(ValueError, match="block_size"):
        FlashAttention(FlashSemantics()).forward(q, q, q, k_cache, v_cache, meta, 0.25)
    assert not k_cache.any() and not v_cache.any()


def test_torch_prefill_ignores_stale_non_finite_rows_past_a_context() -> None:
    """A prefill reads each sequence's first ctx keys only: a NaN or inf left by an earlier request in
    the rest of its last block never reaches the output (the decode masks those rows: test_kernel_inputs)."""
    from rast_engine.attention.torch_backend import TorchAttention

    meta, num_blocks = _metadata([2], [3], 4, "cpu")  # ctx 5: rows 1..3 of the second block are stale
    gen = torch.Generator().manual_seed(7)
    k_cache, v_cache = (torch.randn(num_blocks, 4, 1, 16, generator=gen) for _ in range(2))
    q = torch.randn(3, 2, 16, generator=gen)
    want = TorchAttention().attend(q, None, None, k_cache, v_cache, meta, 0.25)
    last = int(meta.block_tables[0, 1])
    k_cache[last, 1:], v_cache[last, 1:] = float("inf"), float("nan")
    got = TorchAttention().attend(q, None, None, k_cache, v_cache, meta, 0.25)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)
