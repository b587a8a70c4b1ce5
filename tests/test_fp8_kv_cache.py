"""kv_cache_dtype="fp8": K and V stored as float8_e4m3fn with a power-of-two scale per (token, KV head)
(rast_kernels.fp8_kv), read back as the query's dtype. Oracles: the scale rule and the layout written
out here in float64 and explicit indexing, with torch's own float8 conversion, for what the stores write
(bit for bit); and the naive attention of test_paged_attention over caches dequantised that way for the
kernels. Whole models in the engine over FP8 caches: test_fp8_kv_models."""
from __future__ import annotations

import pytest
import torch

from rast_engine.attention.metadata import AttentionMetadata
from rast_engine.attention.torch_backend import TorchAttention, store_kv
from rast_kernels.fp8_kv import fake_quantize
from rast_kernels.kv_store import store_kv_cache
from rast_kernels.layer_ops import rotary_embedding, rotary_embedding_store_kv
from rast_kernels.paged_attention import paged_decode_attention, paged_prefill_attention
from test_paged_attention import oracle, paged, rand

FP8 = torch.float8_e4m3fn
HAS_CUDA = torch.cuda.is_available()
_interp = pytest.mark.skipif(HAS_CUDA, reason="with CUDA the kernels compile natively instead")
CASES = [pytest.param("cpu", dt, id=f"interp-{n}", marks=_interp) for n, dt in
         (("bf16", torch.bfloat16), ("fp32", torch.float32))]
CASES += [pytest.param("cuda", dt, id=f"cuda-{n}", marks=pytest.mark.gpu) for n, dt in
          (("bf16", torch.bfloat16), ("fp32", torch.float32))]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def expected(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, k) of rows x [..., D]: k = ceil(log2(max |x| / 448)) in float64, codes = torch's e4m3 of x / 2^k."""
    amax = x.double().abs().amax(-1)
    k = torch.ceil(torch.log2(amax / 448)).clamp(-126, 126)
    return (x.double() / torch.exp2(k)[..., None]).float().to(FP8), k.int()


def slot_of(cache: torch.Tensor, bs: int, block: int, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [Hkv, D], k [Hkv]) of one slot, read by the layout's definition: values at row ``row``,
    exponents (stored + 127) at byte row % D of row bs + row // D."""
    dim = cache.shape[3]
    return cache[block, row], cache.view(torch.uint8)[block, bs + row // dim, :, row % dim].int() - 127


def gather(cache: torch.Tensor, bs: int, table_row: torch.Tensor, n: int) -> torch.Tensor:
    """A sequence's first n rows, dequantised: codes * 2^k, [n, Hkv, D] float32."""
    rows = []
    for j in range(n):
        codes, k = slot_of(cache, bs, int(table_row[j // bs]), j % bs)
        rows.append(torch.ldexp(codes.float(), k[:, None]))
    return torch.stack(rows)


def test_the_cache_rows_follow_the_block() -> None:
    """A block of 4 tokens at head_dim 32 takes one scale row; 40 tokens at head_dim 16 take three."""
    from rast_engine.models.config import ModelConfig
    from rast_kernels.fp8_kv import block_size_of

    cfg = ModelConfig.from_dict(dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3,
                                     intermediate_size=8, vocab_size=10, model_type="llama"))
    assert cfg.kv_cache_shape(7, 4, FP8) == (7, 5, 1, 32) and cfg.kv_cache_shape(7, 4) == (7, 4, 1, 32)
    assert cfg.kv_bytes_per_block(4, FP8) == 2 * 3 * 5 * 32 and cfg.kv_bytes_per_token(FP8) == 2 * 3 * 33
    for bs in range(1, 80):
        for dim in (4, 16, 32, 64, 128):
            rows = bs + -(-bs // dim)
            assert block_size_of(torch.empty(1, rows, 1, dim, dtype=FP8)) == bs
            assert block_size_of(torch.empty(1, rows, 1, dim)) == rows


def test_copy_on_write_moves_the_scales_with_the_block() -> None:
    """KVCache.copy_blocks (an n > 1 fork of a partial block) copies a block's scale rows with its values,
    in every model of a stacked pool: the copy reads back the source's rows exactly."""
    from rast_engine.kv_cache import KVCache
    from rast_engine.models.config import ModelConfig

    cfg = ModelConfig.from_dict(dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2,
                                     intermediate_size=8, vocab_size=10, model_type="llama"))
    kv = KVCache([cfg, cfg], 6, 4, FP8, torch.device("cpu"), copies=[1, 2])
    g = torch.Generator().manual_seed(0)
    for pool in kv.pools:
        for k_cache, v_cache in pool:
            rows = torch.randn(k_cache.shape[0] * 4, 2, 16, generator=g) * 1000
            store_kv(rows, -rows, k_cache, v_cache, torch.arange(len(rows)))
    before = [c.view(torch.uint8).clone() for pool in kv.pools for layer in pool for c in layer]
    kv.copy_blocks([(1, 4)])
    for old, (pool_i, cache) in zip(before, [(i, c) for i, pool in enumerate(kv.pools) for layer in pool for c in layer]):
        for copy in range(kv.copies[pool_i]):  # model c of a stack keeps block b at c * num_blocks + b
            src, dst = copy * 6 + 1, copy * 6 + 4
            assert torch.equal(cache.view(torch.uint8)[dst], old[src])
            assert torch.equal(cache.view(torch.uint8)[dst + 1], old[dst + 1])  # its neighbour untouched


@pytest.mark.parametrize("device, dtype", CASES)
def test_stores_write_scaled_codes_and_exponents(device: str, dtype: torch.dtype) -> None:
    """store_kv_cache, the fused rotary store and the torch backend's store write each (token, head) row
    as its codes and exponent, rows far past ±448 and far below it alike; nothing at slot -1."""
    g = torch.Generator().manual_seed(0)
    t, hkv, hq, dim, bs = 5, 2, 4, 32, 4
    magnitude = torch.tensor([1e-3, 3.0, 448.0, 2e3, 7e4])[:, None, None]  # per token: one scale each
    k, v = ((torch.randn(t, hkv, dim, generator=g) * magnitude).to(device=device, dtype=dtype) for _ in range(2))
    q = rand(t, hq, dim, dtype=dtype, device=device, g=g)
    slots = torch.tensor([3, -1, 9, 0, 14], device=device)
    positions = torch.arange(t, device=device)
    cos_sin = rand(64, dim, dtype=dtype, device=device, g=g)
    for name in ("kernel", "rotary", "torch"):
        kc, vc = (torch.zeros(4, bs + 1, hkv, dim, dtype=FP8, device=device) for _ in range(2))
        keys = k
        if name == "kernel":
            store_kv_cache(k, v, kc, vc, slots)
        elif name == "rotary":
            _, keys = rotary_embedding_store_kv(positions, q, k, v, cos_sin, kc, vc, slots)
            assert keys.dtype == dtype and torch.equal(keys, rotary_embedding(positions, q, k, cos_sin)[1])
        else:
            store_kv(k.cpu(), v.cpu(), kc := kc.cpu(), vc := vc.cpu(), slots.cpu())
        for i, slot in enumerate(slots.tolist()):
            if slot < 0:
                continue
            for cache, rows in ((kc.cpu(), keys), (vc.cpu(), v)):
                codes, exps = slot_of(cache, bs, slot // bs, slot % bs)
                want_codes, want_exps = expected(rows[i].cpu())
                assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8)), (name, i)
                assert torch.equal(exps, want_exps), (name, i)
        assert int(kc.cpu().view(torch.uint8)[1].count_nonzero()) == 0, name  # block 1 (slots 4-7) holds no token


@pytest.mark.parametrize("device, dtype", CASES)
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_and_prefill_read_fp8_caches(device: str, dtype: torch.dtype, splits: int) -> None:
    """The kernels over caches the torch store filled with rows of scales from 2^-12 to 2^12: the naive
    attention over the dequantised rows."""
    g = torch.Generator().manual_seed(splits)
    hq, hkv, dim, bs = 4, 2, 32, 4
    lens, q_lens = [7, 19, 1], [3, 5, 1]
    table, nb = paged(lens, bs, 2, seed=3)
    kc, vc = (torch.zeros(nb, bs + 1, hkv, dim, dtype=FP8) for _ in range(2))
    slots = torch.arange(nb * bs)
    scales = torch.exp2(torch.randint(-12, 13, (nb * bs, hkv, 1), generator=g).float())
    store_kv(*(torch.randn(nb * bs, hkv, dim, generator=g) * scales for _ in range(2)), kc, vc, slots)
    keys = [gather(kc, bs, table[b], n) for b, n in enumerate(lens)]
    values = [gather(vc, bs, table[b], n) for b, n in enumerate(lens)]
    kc, vc, table = kc.to(device), vc.to(device), table.to(device)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    scale = dim ** -0.5 / 64  # keys up to 2^12 * 4: keep the scores finite in every dtype
    q = rand(len(lens), hq, dim, dtype=dtype, device=device, g=g)
    got = paged_decode_attention(q, kc, vc, table, ctx, scale, num_splits=splits, min_tokens_per_split=4)
    want = oracle(q.cpu(), keys, values, [1] * len(lens), scale)
    torch.testing.assert_close(got.float().cpu() / want.abs().amax(), want / want.abs().amax(), **TOL[dtype])
    if splits == 1:
        q = rand(sum(q_lens), hq, dim, dtype=dtype, device=device, g=g)
        cu = torch.tensor([0, 3, 8, 9], dtype=torch.int32, device=device)
        got = paged_prefill_attention(q, kc, vc, table, ctx, cu, max(q_lens), scale)
        want = oracle(q.cpu(), keys, values, q_lens, scale)
        torch.testing.assert_close(got.float().cpu() / want.abs().amax(), want / want.abs().amax(), **TOL[dtype])
    with pytest.raises(TypeError, match="caches"):
        paged_decode_attention(q[:3], kc.view(torch.uint8), vc.view(torch.uint8), table, ctx, scale)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=_interp), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp16_keys_at_its_largest_value_stay_finite(device: str) -> None:
    """fp16's 65504 is stored as the code 256 · 2^8 = 65536, past fp16: dequantised in fp16 it was inf, and
    the head's output NaN. The kernels and the torch backend clamp to 65504; the oracle is float64 attention."""
    dim, bs = 16, 4
    k = torch.zeros(2, 1, dim, dtype=torch.float16)
    k[0, 0, 0], k[1, 0, 0] = 65504.0, -65504.0
    v = torch.ones(2, 1, dim, dtype=torch.float16)
    v[0, 0, 1] = 65504.0
    v[:, 0, 2] = 65504.0  # a mean of 65504 itself: 65536 past fp16 unless each value is clamped
    kc, vc = (torch.zeros(1, bs + 1, 1, dim, dtype=FP8, device=device) for _ in range(2))
    store_kv_cache(k.to(device), v.to(device), kc, vc, torch.tensor([0, 1], device=device))
    q = torch.zeros(1, 1, dim, dtype=torch.float16, device=device)
    q[0, 0, 1] = 1.0  # q · k = 0 for both keys: equal weights
    table, ctx = torch.zeros(1, 1, dtype=torch.int32, device=device), torch.tensor([2], dtype=torch.int32, device=device)
    want = v.double().mean(0)[0]  # [D]; the lone 65504 of v averages to 32752
    got = paged_decode_attention(q, kc, vc, table, ctx, 0.25)[0, 0]
    cu = torch.tensor([0, 2], dtype=torch.int32, device=device)
    pre = paged_prefill_attention(q.expand(2, 1, dim).contiguous(), kc, vc, table, ctx, cu, 2, 0.25)[1, 0]
    # the torch backend (the CPU's default) read the caches in float32 unclamped: 65536 · 1/2, cast to fp16
    meta = dict(slot_mapping=torch.full((1,), -1, device=device), block_tables=table, context_lens=ctx,
                max_seqlen_k=2, block_size=bs)
    torch_decode = TorchAttention().attend(q, q, q, kc, vc, AttentionMetadata(
        is_prefill=False, cu_seqlens_q=cu[:2] // 2, max_seqlen_q=1, **meta), 0.25)[0, 0]
    torch_prefill = TorchAttention().attend(q.expand(2, 1, dim), q, q, kc, vc, AttentionMetadata(
        is_prefill=True, cu_seqlens_q=cu, max_seqlen_q=2, **meta), 0.25)[1, 0]
    for out in (got, pre, torch_decode, torch_prefill):
        torch.testing.assert_close(out.double().cpu(), want, atol=0, rtol=1e-3)


def test_scales_keep_what_saturation_loses() -> None:
    """Why the scales: keys with a channel near 1000 (as Qwen2's k biases make them) and values with one
    near 2000. Attention over the scaled FP8 rows stays within 3% of exact attention; over an unscaled,
    saturating cache (vLLM's fp8 without calibrated scales) it is off by more than half."""
    g = torch.Generator().manual_seed(0)
    n, dim = 64, 32
    keys, values = torch.randn(n, 1, dim, generator=g), torch.randn(n, 1, dim, generator=g)
    keys[..., 3] += 1000 + 50 * torch.randn(n, 1, generator=g)
    values[..., 5] += 2000
    q = torch.randn(1, 1, dim, generator=g) * 0.1
    attend = lambda k, v: oracle(q, [k], [v], [1], dim ** -0.5)  # noqa: E731
    exact = attend(keys, values)
    scaled = attend(fake_quantize(keys), fake_quantize(values))
    saturated = attend(*(t.clamp(-448, 448).to(FP8).float() for t in (keys, values)))
    error = lambda out: float((out - exact).abs().max() / exact.abs().max())  # noqa: E731
    assert error(scaled) < 0.03 and error(saturated) > 0.5, (error(scaled), error(saturated))
