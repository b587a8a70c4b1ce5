"""Sliding-window attention, and Gemma 2's capped scores: the paged kernels and the backends against an
oracle written here, which attends each query row over an explicit slice of its keys (HF's window: the
token at position p sees positions p - window + 1 .. p), one row at a time, capping each score as
cap * tanh(s / cap); the Triton kernels run interpreted without CUDA."""
from __future__ import annotations

import pytest
import torch

from test_attention_backends import _compare_backends, _metadata
from test_paged_attention import CASES, TOL, gather, paged, rand


def windowed_oracle(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], q_lens: list[int],
                    scale: float, window: int | None, softcap: float | None = None) -> torch.Tensor:
    """q [T, Hq, D]; keys[b], values[b] [n_b, Hkv, D]; each sequence's last q_lens[b] positions attend."""
    rows, at = [], 0
    for k, v, m in zip(keys, values, q_lens):
        n, group = k.shape[0], q.shape[1] // k.shape[1]
        for i in range(m):
            pos = n - m + i
            first = 0 if window is None else max(0, pos - window + 1)
            ks = k[first:pos + 1].repeat_interleave(group, dim=1)  # [keys, Hq, D]
            vs = v[first:pos + 1].repeat_interleave(group, dim=1)
            scores = torch.einsum("hd,nhd->hn", q[at + i].float(), ks) * scale
            p = torch.softmax(scores if softcap is None else softcap * torch.tanh(scores / softcap), dim=-1)
            rows.append(torch.einsum("hn,nhd->hd", p, vs))
        at += m
    return torch.stack(rows)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("window", [1, 3, 16, 17, 100])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_sees_the_last_window_keys(device: str, dtype: torch.dtype, window: int, splits: int) -> None:
    """Windows shorter than a tile, one tile, past a tile edge and wider than every context, with split-K
    cutting the window among splits (a 2-token floor, so short windows fill several)."""
    from rast_kernels.paged_attention import paged_decode_attention

    lens, bs, hq, hkv, dim = [37, 5, 20, 0], 4, 4, 2, 16
    g = torch.Generator().manual_seed(window)
    table, num_blocks = paged([max(n, 1) for n in lens], bs, spare=2, seed=3)
    k_cache, v_cache = (rand(num_blocks, bs, hkv, dim, dtype=dtype, device=device, g=g) for _ in range(2))
    q = rand(len(lens), hq, dim, dtype=dtype, device=device, g=g)
    out = paged_decode_attention(q, k_cache, v_cache, table.to(device),
                                 torch.tensor(lens, dtype=torch.int32, device=device), 0.25, num_splits=splits,
                                 min_tokens_per_split=2, window=window)
    live = [b for b, n in enumerate(lens) if n]
    keys = [gather(k_cache.cpu(), table[b], lens[b]) for b in live]
    values = [gather(v_cache.cpu(), table[b], lens[b]) for b in live]
    want = windowed_oracle(q.cpu()[live], keys, values, [1] * len(live), 0.25, window)
    torch.testing.assert_close(out.float().cpu()[live], want, **TOL[dtype])
    assert not out[3].any()  # a context of 0 (graph padding) still reads nothing


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("window", [1, 5, 16, 40])
@pytest.mark.parametrize("prefix,new", [([0, 0], [23, 9]), ([21, 3], [19, 1])])
def test_prefill_rows_see_their_own_windows(device: str, dtype: torch.dtype, window: int, prefix: list[int],
                                            new: list[int]) -> None:
    """Fresh prompts and chunks after a cached prefix, longer than a 16-row tile, so a tile's rows start
    their windows at different keys."""
    from rast_kernels.paged_attention import paged_prefill_attention

    lens, bs, hq, hkv, dim = [p + n for p, n in zip(prefix, new)], 4, 4, 2, 16
    g = torch.Generator().manual_seed(window + 50)
    table, num_blocks = paged(lens, bs, spare=2, seed=4)
    k_cache, v_cache = (rand(num_blocks, bs, hkv, dim, dtype=dtype, device=device, g=g) for _ in range(2))
    q = rand(sum(new), hq, dim, dtype=dtype, device=device, g=g)
    cu = torch.tensor([0] + new).cumsum(0).to(torch.int32)
    out = paged_prefill_attention(q, k_cache, v_cache, table.to(device),
                                  torch.tensor(lens, dtype=torch.int32, device=device), cu.to(device), max(new),
                                  0.25, window=window)
    keys = [gather(k_cache.cpu(), table[b], n) for b, n in enumerate(lens)]
    values = [gather(v_cache.cpu(), table[b], n) for b, n in enumerate(lens)]
    want = windowed_oracle(q.cpu(), keys, values, new, 0.25, window)
    torch.testing.assert_close(out.float().cpu(), want, **TOL[dtype])


@pytest.mark.parametrize("window", [None, 1, 6])
@pytest.mark.parametrize("prefix,new", [([0, 0], [7, 12]), ([9, 0], [4, 6]), ([13, 30], [1, 1])])
def test_torch_backend_windows_equal_the_oracle(window: int | None, prefix: list[int], new: list[int]) -> None:
    from rast_engine.attention.torch_backend import TorchAttention

    meta, num_blocks = _metadata(prefix, new, 4, "cpu")
    g = torch.Generator().manual_seed(9)
    k_cache, v_cache = (rand(num_blocks, 4, 2, 16, dtype=torch.float32, device="cpu", g=g) for _ in range(2))
    q = rand(sum(new), 4, 16, dtype=torch.float32, device="cpu", g=g)
    got = TorchAttention().attend(q, None, None, k_cache, v_cache, meta, 0.25, window)
    lens = meta.context_lens.tolist()
    keys = [gather(k_cache, meta.block_tables[b], n) for b, n in enumerate(lens)]
    values = [gather(v_cache, meta.block_tables[b], n) for b, n in enumerate(lens)]
    torch.testing.assert_close(got, windowed_oracle(q, keys, values, new, 0.25, window), **TOL[torch.float32])


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("prefix,new", [([0, 0], [7, 12]), ([9, 0], [4, 6]), ([13, 30], [1, 1])])
def test_triton_backend_windows_equal_torch_backend(device: str, dtype: torch.dtype, prefix: list[int],
                                                    new: list[int]) -> None:
    from rast_engine.attention.triton_backend import TritonAttention

    _compare_backends(TritonAttention(num_splits=2 if max(new) == 1 else None), device, dtype, prefix, new, window=5)


@pytest.mark.parametrize("window", [0, -1, 2.0, True])
def test_a_window_must_be_a_positive_int(window: object) -> None:
    from rast_kernels.paged_attention import paged_decode_attention, paged_prefill_attention

    cache, table = torch.zeros(2, 4, 1, 16), torch.zeros(1, 1, dtype=torch.int32)
    lens = torch.tensor([3], dtype=torch.int32)
    with pytest.raises(ValueError, match="window"):
        paged_decode_attention(torch.zeros(1, 1, 16), cache, cache, table, lens, 1.0, window=window)
    with pytest.raises(ValueError, match="window"):
        paged_prefill_attention(torch.zeros(3, 1, 16), cache, cache, table, lens, torch.tensor([0, 3]), 3, 1.0,
                                window=window)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("window", [None, 6])
def test_capped_scores_in_decode_and_prefill(device: str, dtype: torch.dtype, window: int | None) -> None:
    """Gemma 2's attention: scores of about +-4 capped at 1.5 (so the cap changes every softmax), split-K on."""
    from rast_kernels.paged_attention import paged_decode_attention, paged_prefill_attention

    lens, new, bs, hq, hkv, dim = [37, 20], [19, 20], 4, 4, 2, 16
    g = torch.Generator().manual_seed(13)
    table, num_blocks = paged(lens, bs, spare=2, seed=6)
    k_cache, v_cache = (rand(num_blocks, bs, hkv, dim, dtype=dtype, device=device, g=g) for _ in range(2))
    keys = [gather(k_cache.cpu(), table[b], n) for b, n in enumerate(lens)]
    values = [gather(v_cache.cpu(), table[b], n) for b, n in enumerate(lens)]
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    q = rand(len(lens), hq, dim, dtype=dtype, device=device, g=g)
    out = paged_decode_attention(q, k_cache, v_cache, table.to(device), ctx, 1.0, num_splits=3,
                                 min_tokens_per_split=4, window=window, softcap=1.5)
    want = windowed_oracle(q.cpu(), keys, values, [1, 1], 1.0, window, softcap=1.5)
    torch.testing.assert_close(out.float().cpu(), want, **TOL[dtype])
    uncapped = windowed_oracle(q.cpu(), keys, values, [1, 1], 1.0, window)
    assert (uncapped - want).abs().max() > 0.05  # the cap is in play
    qp = rand(sum(new), hq, dim, dtype=dtype, device=device, g=g)
    cu = torch.tensor([0] + new).cumsum(0).to(torch.int32).to(device)
    out = paged_prefill_attention(qp, k_cache, v_cache, table.to(device), ctx, cu, max(new), 1.0, window=window,
                                  softcap=1.5)
    want = windowed_oracle(qp.cpu(), keys, values, new, 1.0, window, softcap=1.5)
    torch.testing.assert_close(out.float().cpu(), want, **TOL[dtype])


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_torch_and_triton_backends_cap_alike(softcap: float | None) -> None:
    from rast_engine.attention.triton_backend import TritonAttention

    _compare_backends(TritonAttention(num_splits=2), "cpu", torch.float32, [13, 30], [1, 1], window=5, softcap=softcap)
    _compare_backends(TritonAttention(), "cpu", torch.float32, [9, 0], [4, 6], softcap=softcap)
