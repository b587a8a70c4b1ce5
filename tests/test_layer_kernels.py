"""rast_kernels.layer_ops against HF transformers' own Qwen2 code (the oracle): RMSNorm with and without
the residual add, apply_rotary_pos_emb over Qwen2RotaryEmbedding's tables (after Qwen3's per-head
RMSNorm, Qwen3RMSNorm, when fused), and the MLP's silu(gate) * up (Gemma's gelu_tanh(gate) * up).
Whole models on these kernels are checked against HF's forward in test_models.py.

The kernels claim to round every intermediate exactly where HF's ops round it, so in bf16 / fp16 the
test asks for more than closeness: almost every element must be bit-equal (a skipped or extra rounding
flips a large fraction of them by one unit), and no element may differ by more than one unit.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, Qwen2RotaryEmbedding, apply_rotary_pos_emb
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from factories import make_model_dir
from rast_engine.attention.triton_backend import TritonAttention
from rast_engine.errors import RastError
from rast_engine.models import load_model
from rast_engine.models.layer_ops import get_layer_ops
from rast_kernels import launch
from rast_kernels.layer_ops import (add_rms_norm, gelu_tanh_and_mul, rms_norm, rotary_embedding,
                                   rotary_embedding_store_kv, silu_and_mul)

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
_interp = pytest.mark.skipif(HAS_CUDA, reason="with CUDA the kernels compile natively instead")
CASES = [pytest.param("cpu", dt, id=f"interp-{name}", marks=_interp) for name, dt in
         (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))]
CASES += [pytest.param("cuda", dt, id=f"cuda-{name}", marks=pytest.mark.gpu) for name, dt in
          (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))]


def assert_hf_equal(got: torch.Tensor, want: torch.Tensor, min_bit_equal: float = 0.98) -> None:
    """fp32: within 4 ulp. bf16 / fp16: at most one unit of the dtype apart, and at least
    ``min_bit_equal`` of the elements bit-equal."""
    assert got.shape == want.shape and got.dtype == want.dtype
    g, w = got.float(), want.float()
    ulp = torch.finfo(got.dtype).eps * w.abs().clamp_min(torch.finfo(got.dtype).tiny)
    if got.dtype == torch.float32:
        assert ((g - w).abs() <= 4 * ulp + 1e-30).all(), (g - w).abs().max()
        return
    assert ((g - w).abs() <= ulp).all(), f"max diff {(g - w).abs().max()} exceeds one unit"
    equal = (got == want).float().mean().item()
    assert equal >= min_bit_equal, f"only {equal:.3f} of the elements are bit-equal to HF's"


def _strided_rows(t: int, n: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    """[t, n] rows that are a view into a wider buffer (as a fused projection's output slices are)."""
    wide = torch.randn(t, n + 24, generator=gen).mul(3).to(dtype).to(device)
    return wide[:, 8:8 + n]


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (5, 96), (3, 1000)])
def test_rms_norm_and_residual_match_hf(device: str, dtype: torch.dtype, tokens: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(hidden + tokens)
    x = _strided_rows(tokens, hidden, dtype, device, gen)
    residual = torch.randn(tokens, hidden, generator=gen).to(dtype).to(device)
    hf = Qwen2RMSNorm(hidden, eps=1e-6).to(device=device, dtype=dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.rand(hidden, generator=gen).add(0.5))
        assert_hf_equal(rms_norm(x, hf.weight, 1e-6), hf(x))
        s_want = residual + x
        y, s = add_rms_norm(x, residual, hf.weight, 1e-6)
    assert torch.equal(s, s_want)  # one rounded add, exactly HF's residual
    assert_hf_equal(y, hf(s_want))


@pytest.mark.parametrize("device,dtype", CASES)
def test_grouped_weights_norm_each_group_with_its_own(device: str, dtype: torch.dtype) -> None:
    """weight [G, N]: rows of G models stacked in one batch (an (rl, base) pair), each group normed as
    a call on its own rows with its own weight would norm it, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    groups, tokens, hidden = 2, 3, 96
    x = _strided_rows(groups * tokens, hidden, dtype, device, gen)
    residual = torch.randn(groups * tokens, hidden, generator=gen).to(dtype).to(device)
    weight = torch.rand(groups, hidden, generator=gen).add(0.5).to(dtype).to(device)
    y, s = add_rms_norm(x, residual, weight, 1e-6)
    plain = rms_norm(x, weight, 1e-6)
    for g in range(groups):
        rows = slice(g * tokens, (g + 1) * tokens)
        y_g, s_g = add_rms_norm(x[rows], residual[rows], weight[g], 1e-6)
        assert torch.equal(y[rows], y_g) and torch.equal(s[rows], s_g)
        assert torch.equal(plain[rows], rms_norm(x[rows], weight[g], 1e-6))


def hf_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, config: Qwen2Config
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF's rotated (q, k) for [T, H, D] inputs, and its cos/sin as our [max_pos, D] table."""
    rope = Qwen2RotaryEmbedding(config).to(q.device)
    cos, sin = rope(q, positions[None])  # [1, T, D]
    qe, ke = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    table_pos = torch.arange(config.max_position_embeddings, device=q.device)
    tcos, tsin = rope(q, table_pos[None])
    half = q.shape[-1] // 2
    table = torch.cat([tcos[0, :, :half], tsin[0, :, :half]], dim=-1)
    return qe[0].transpose(0, 1), ke[0].transpose(0, 1), table


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("tokens,hq,hk,dim", [(1, 4, 2, 16), (6, 7, 1, 32), (3, 2, 2, 128), (2, 20, 4, 64)])
def test_rotary_matches_hf(device: str, dtype: torch.dtype, tokens: int, hq: int, hk: int, dim: int) -> None:
    config = Qwen2Config(hidden_size=hq * dim, num_attention_heads=hq, num_key_value_heads=hk,
                         max_position_embeddings=300, rope_theta=10000.0)
    gen = torch.Generator().manual_seed(dim * hq + tokens)
    qkv = torch.randn(tokens, (hq + 2 * hk) * dim, generator=gen).to(dtype).to(device)
    q = qkv[:, :hq * dim].view(tokens, hq, dim)  # strided views, as the model passes them
    k = qkv[:, hq * dim:(hq + hk) * dim].view(tokens, hk, dim)
    positions = torch.randint(0, 300, (tokens,), generator=gen).to(device)
    q_want, k_want, table = hf_rotary(q, k, positions, config)
    q_got, k_got = rotary_embedding(positions, q, k, table)
    assert q_got.is_contiguous() and k_got.is_contiguous()
    assert_hf_equal(q_got, q_want.contiguous(), min_bit_equal=1.0)
    assert_hf_equal(k_got, k_want.contiguous(), min_bit_equal=1.0)


def _hf_head_norms(dim: int, groups: int, dtype: torch.dtype, device: str, gen: torch.Generator
                   ) -> list[tuple[Qwen3RMSNorm, Qwen3RMSNorm]]:
    """(q_norm, k_norm) per model: HF's Qwen3 modules with weights away from one."""
    out = []
    for _ in range(groups):
        pair = (Qwen3RMSNorm(dim, eps=1e-6), Qwen3RMSNorm(dim, eps=1e-6))
        for norm in pair:
            norm.weight.data = (1 + 0.3 * torch.randn(dim, generator=gen)).to(dtype)
        out.append(tuple(n.to(device) for n in pair))
    return out


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("tokens,hq,hk,dim,groups,store", [(1, 4, 2, 16, 1, False), (6, 7, 1, 32, 2, True),
                                                           (4, 8, 4, 128, 1, True), (6, 4, 2, 64, 3, False)])
def test_rotary_with_qk_norm_matches_hf_qwen3(device: str, dtype: torch.dtype, tokens: int, hq: int, hk: int,
                                              dim: int, groups: int, store: bool) -> None:
    """Qwen3's q_norm / k_norm of each head fused before the rotary: HF's Qwen3RMSNorm, then
    apply_rotary_pos_emb. groups > 1: the tokens are that many models' stacked, normed with [G, D]
    weights, group g's tokens with row g (stacked small models)."""
    config = Qwen2Config(hidden_size=hq * dim, num_attention_heads=hq, num_key_value_heads=hk,
                         max_position_embeddings=300, rope_theta=10000.0)
    gen = torch.Generator().manual_seed(dim * hq + tokens + groups)
    qkv = torch.randn(tokens, (hq + 2 * hk) * dim, generator=gen).mul(2).to(dtype).to(device)
    q, k, v = (x.view(tokens, -1, dim) for x in qkv.split([hq * dim, hk * dim, hk * dim], dim=-1))
    positions = torch.randint(0, 300, (tokens,), generator=gen).to(device)
    norms = _hf_head_norms(dim, groups, dtype, device, gen)
    per = tokens // groups
    with torch.no_grad():
        qn = torch.cat([norms[g][0](q[g * per:(g + 1) * per]) for g in range(groups)])
        kn = torch.cat([norms[g][1](k[g * per:(g + 1) * per]) for g in range(groups)])
    q_want, k_want, table = hf_rotary(qn, kn, positions, config)
    weights = [torch.stack([n[i].weight.data for n in norms]) if groups > 1 else norms[0][i].weight.data
               for i in (0, 1)]
    qk_norm = (weights[0], weights[1], 1e-6)
    if store:
        cache = torch.zeros(tokens + 2, 1, hk, dim, dtype=dtype, device=device)
        v_cache = torch.zeros_like(cache)
        slots = torch.arange(tokens, device=device)
        q_got, k_got = rotary_embedding_store_kv(positions, q, k, v, table, cache, v_cache, slots, qk_norm)
        assert torch.equal(cache[:tokens, 0], k_got)
    else:
        q_got, k_got = rotary_embedding(positions, q, k, table, qk_norm)
    for got, want in ((q_got, q_want.contiguous()), (k_got, k_want.contiguous())):
        if dtype == torch.float32:  # the norm's ulp-level sum-order difference, through the rotation's
            # cancellations: a few ulp of the head's scale rather than of each element
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(got, want, rtol=4 * eps, atol=4 * eps * want.abs().max().item())
        else:
            assert_hf_equal(got, want)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("tokens,hq,hk,dim,block", [(1, 4, 2, 16, 16), (6, 7, 1, 32, 4), (5, 20, 4, 64, 8)])
def test_rotary_store_kv_writes_hf_keys_into_the_cache(device: str, dtype: torch.dtype, tokens: int, hq: int,
                                                       hk: int, dim: int, block: int) -> None:
    """The fused rotary + KV store: q and k as HF rotates them, and the cache after it as an index
    assignment of HF's k and the raw v at each token's slot; slot -1 and every other slot untouched."""
    config = Qwen2Config(hidden_size=hq * dim, num_attention_heads=hq, num_key_value_heads=hk,
                         max_position_embeddings=300, rope_theta=10000.0)
    gen = torch.Generator().manual_seed(dim * hq + tokens + block)
    qkv = torch.randn(tokens, (hq + 2 * hk) * dim, generator=gen).to(dtype).to(device)
    q, k, v = (x.view(tokens, -1, dim) for x in qkv.split([hq * dim, hk * dim, hk * dim], dim=-1))
    positions = torch.randint(0, 300, (tokens,), generator=gen).to(device)
    blocks = tokens // block + 2
    k_cache = torch.randn(blocks, block, hk, dim, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(blocks, block, hk, dim, generator=gen).to(dtype).to(device)
    slots = torch.randperm(blocks * block, generator=gen)[:tokens]
    slots[tokens // 2] = -1  # a padding row: stored nowhere
    q_want, k_want, table = hf_rotary(q, k, positions, config)
    k_flat, v_flat = k_cache.view(-1, hk, dim).clone(), v_cache.view(-1, hk, dim).clone()
    live = slots >= 0
    k_flat[slots[live]] = k_want[live.to(device)]
    v_flat[slots[live]] = v[live.to(device)]
    q_got, k_got = rotary_embedding_store_kv(positions, q, k, v, table, k_cache, v_cache, slots.to(device))
    assert_hf_equal(q_got, q_want.contiguous(), min_bit_equal=1.0)
    assert_hf_equal(k_got, k_want.contiguous(), min_bit_equal=1.0)
    assert torch.equal(k_cache.view(-1, hk, dim), k_flat) and torch.equal(v_cache.view(-1, hk, dim), v_flat)


def test_rotary_store_kv_refuses_a_mismatched_cache() -> None:
    pos, table = torch.zeros(2, dtype=torch.int64, device=DEV), torch.zeros(10, 4, device=DEV)
    q, k, v = torch.randn(2, 2, 4, device=DEV), torch.randn(2, 1, 4, device=DEV), torch.randn(2, 1, 4, device=DEV)
    cache, slots = torch.zeros(3, 4, 1, 4, device=DEV), torch.tensor([0, 5], device=DEV)
    with pytest.raises(ValueError, match="v must match k"):
        rotary_embedding_store_kv(pos, q, k, v[:, :, :2], table, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="k_cache/v_cache must be"):
        rotary_embedding_store_kv(pos, q, k, v, table, torch.zeros(3, 4, 2, 4, device=DEV), cache, slots)
    with pytest.raises(TypeError, match="the caches must have"):
        rotary_embedding_store_kv(pos, q, k, v, table, cache.half(), cache.half(), slots)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        rotary_embedding_store_kv(pos, q, k, v, table, cache, cache.clone(), slots[:1])
    assert torch.equal(cache, torch.zeros_like(cache))  # refused before anything was written
    q_out, k_out = rotary_embedding_store_kv(pos[:0], q[:0], k[:0], v[:0], table, cache, cache.clone(), slots[:0])
    assert q_out.shape == (0, 2, 4) and k_out.shape == (0, 1, 4)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("tokens,inter", [(1, 64), (4, 1500)])
def test_silu_and_mul_matches_hf(device: str, dtype: torch.dtype, tokens: int, inter: int) -> None:
    gen = torch.Generator().manual_seed(inter)
    gate_up = _strided_rows(tokens, 2 * inter, dtype, device, gen)
    gate, up = gate_up.chunk(2, dim=-1)
    want = torch.nn.SiLU()(gate) * up  # Qwen2MLP: act_fn(gate_proj(x)) * up_proj(x)
    assert_hf_equal(silu_and_mul(gate_up), want)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("tokens,inter", [(1, 64), (4, 1500)])
def test_gelu_tanh_and_mul_matches_hf(device: str, dtype: torch.dtype, tokens: int, inter: int) -> None:
    gen = torch.Generator().manual_seed(inter + 1)
    gate_up = _strided_rows(tokens, 2 * inter, dtype, device, gen) * 3  # into tanh's curved range
    gate, up = gate_up.chunk(2, dim=-1)
    want = torch.nn.GELU(approximate="tanh")(gate) * up  # Gemma3MLP: act_fn(gate_proj(x)) * up_proj(x)
    got = gelu_tanh_and_mul(gate_up)
    # tanh's implementations differ by an ulp, which 1 + tanh(..) near -1 magnifies in tiny outputs: within
    # a unit of the dtype, or 1e-5 absolute, of torch's; in 16 bits most elements round to the same value
    g, w = got.float(), want.float()
    unit = torch.finfo(dtype).eps * w.abs()
    assert got.dtype == want.dtype and ((g - w).abs() <= unit + 1e-5).all(), (g - w).abs().max()
    assert dtype == torch.float32 or (got == want).float().mean().item() >= 0.9


def test_empty_batches_launch_nothing() -> None:
    w = torch.ones(8, device=DEV)
    assert rms_norm(torch.empty(0, 8, device=DEV), w, 1e-6).shape == (0, 8)
    assert silu_and_mul(torch.empty(0, 8, device=DEV)).shape == (0, 4)
    q, k = rotary_embedding(torch.empty(0, dtype=torch.int64, device=DEV), torch.empty(0, 2, 4, device=DEV),
                            torch.empty(0, 1, 4, device=DEV), torch.zeros(10, 4, device=DEV))
    assert q.shape == (0, 2, 4) and k.shape == (0, 1, 4)


def test_bad_inputs_are_refused() -> None:
    x = torch.randn(2, 8, device=DEV)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(7, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(8, dtype=torch.bfloat16, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(16, device=DEV)[::2], 1e-6)
    with pytest.raises(ValueError, match=r"G dividing the 2 rows"):
        rms_norm(x, torch.ones(3, 8, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="residual must match"):
        add_rms_norm(x, torch.randn(3, 8, device=DEV), torch.ones(8, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="contiguous along"):
        rms_norm(torch.randn(8, 2, device=DEV).t(), torch.ones(8, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="even width"):
        silu_and_mul(torch.randn(2, 7, device=DEV))
    pos, table = torch.zeros(3, dtype=torch.int64, device=DEV), torch.zeros(10, 4, device=DEV)
    q, k = torch.randn(2, 2, 4, device=DEV), torch.randn(2, 1, 4, device=DEV)
    with pytest.raises(ValueError, match="positions must be"):
        rotary_embedding(pos, q, k, table)
    with pytest.raises(TypeError, match="share one float dtype"):
        rotary_embedding(pos[:2], q, k, table.to(torch.bfloat16))


@_interp
def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "_INTERPRETING", False)
    with pytest.raises(RastError, match="TRITON_INTERPRET"):
        get_layer_ops("triton", "cpu")  # at engine construction, not at the first forward
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        rotary_embedding(torch.zeros(2, dtype=torch.int64), torch.randn(2, 2, 4), torch.randn(2, 1, 4),
                         torch.zeros(10, 4))


@_interp
def test_bf16_model_on_fused_ops_tracks_the_torch_ops(tmp_path: Path) -> None:
    """A whole bf16 model (prefill of two sequences, then decode steps) on the fused kernels against the
    same weights on the torch ops: the kernels round where the torch ops do, so almost every logit is
    bit-equal (only the RMSNorm sums' order may differ). Dropping the activation's one rounding, say,
    leaves about a quarter of them bit-equal."""
    from test_models import run_paged

    path = make_model_dir(tmp_path, layers=2, hidden=64, intermediate=128, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 100, (n,), generator=gen).tolist() for n in (11, 8)]
    got = {}
    for name in ("torch", "triton"):
        model = load_model(path, device="cpu", dtype="bfloat16", attention=TritonAttention(),
                           ops=get_layer_ops(name, "cpu"))
        got[name] = run_paged(model, seqs, [[7], [4]])
    for fused, plain in zip(got["triton"], got["torch"]):
        assert fused.dtype == torch.bfloat16 and fused.shape == plain.shape
        torch.testing.assert_close(fused.float(), plain.float(), atol=0.05, rtol=0.02)
        assert (fused == plain).float().mean() >= 0.9, "almost every logit should be bit-equal"
