"""kv_cache_dtype="fp8": K and V stored as float8_e4m3fn (rounded to nearest even, saturated at ±448) and
read back as the query's dtype. Oracles: torch's own float8 conversion for what the stores write (bit for
bit), the naive attention of test_paged_attention over the dequantised caches for the kernels, and HF
transformers' forward with an attention function that rounds its keys and values through float8 for
whole models in the engine."""
from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

from rast_engine import LLM, SamplingParams
from rast_engine.attention.torch_backend import store_kv
from rast_engine.errors import RastError
from rast_kernels.layer_ops import rotary_embedding, rotary_embedding_store_kv
from rast_kernels.paged_attention import paged_decode_attention, paged_prefill_attention, store_kv_cache
from test_paged_attention import gather, oracle, paged, rand

FP8 = torch.float8_e4m3fn
HAS_CUDA = torch.cuda.is_available()
_interp = pytest.mark.skipif(HAS_CUDA, reason="with CUDA the kernels compile natively instead")
CASES = [pytest.param("cpu", dt, id=f"interp-{n}", marks=_interp) for n, dt in
         (("bf16", torch.bfloat16), ("fp32", torch.float32))]
CASES += [pytest.param("cuda", dt, id=f"cuda-{n}", marks=pytest.mark.gpu) for n, dt in
          (("bf16", torch.bfloat16), ("fp32", torch.float32))]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def rounded(x: torch.Tensor) -> torch.Tensor:
    return x.float().clamp(-448, 448).to(FP8)


@pytest.mark.parametrize("device, dtype", CASES)
def test_stores_write_torchs_float8_bits(device: str, dtype: torch.dtype) -> None:
    """store_kv_cache, the fused rotary store and the torch backend's store write the same bytes: torch's
    conversion of k and v (large values saturate), and nothing at slot -1."""
    g = torch.Generator().manual_seed(0)
    t, hkv, hq, dim, bs = 5, 2, 4, 32, 4
    k, v = (rand(t, hkv, dim, dtype=dtype, device=device, g=g) * 200 for _ in range(2))  # some past ±448
    q = rand(t, hq, dim, dtype=dtype, device=device, g=g)
    slots = torch.tensor([3, -1, 9, 0, 14], device=device)
    positions = torch.arange(t, device=device)
    cos_sin = rand(64, dim, dtype=dtype, device=device, g=g)
    caches = {}
    for name in ("kernel", "rotary", "torch"):
        kc, vc = (torch.zeros(4, bs, hkv, dim, dtype=FP8, device=device) for _ in range(2))
        if name == "kernel":
            store_kv_cache(k, v, kc, vc, slots)
        elif name == "rotary":
            _, k_rot = rotary_embedding_store_kv(positions, q, k, v, cos_sin, kc, vc, slots)
        else:
            store_kv(k.cpu(), v.cpu(), kc := kc.cpu(), vc := vc.cpu(), slots.cpu())
        caches[name] = (kc.cpu().view(torch.uint8), vc.cpu().view(torch.uint8))
    flat = lambda c: c.view(-1, hkv, dim)  # noqa: E731
    for name, (kc, vc) in caches.items():
        keys = k_rot if name == "rotary" else k
        assert torch.equal(flat(kc)[slots[slots >= 0].cpu()], rounded(keys[slots >= 0].cpu()).view(torch.uint8)), name
        assert torch.equal(flat(vc)[slots[slots >= 0].cpu()], rounded(v[slots >= 0].cpu()).view(torch.uint8)), name
        assert int(flat(kc)[[1, 2]].count_nonzero()) == 0  # untouched slots (slot -1's row stored nowhere)
    assert k_rot.dtype == dtype  # the rotated k itself keeps the model's dtype
    assert torch.equal(*(rotary_embedding(positions, q, k, cos_sin)[1], k_rot))


@pytest.mark.parametrize("device, dtype", CASES)
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_and_prefill_read_fp8_caches(device: str, dtype: torch.dtype, splits: int) -> None:
    g = torch.Generator().manual_seed(splits)
    hq, hkv, dim, bs = 4, 2, 32, 4
    lens, q_lens = [7, 19, 1], [3, 5, 1]
    table, nb = paged(lens, bs, 2, seed=3)
    kc, vc = (rounded(torch.randn(nb, bs, hkv, dim, generator=g) * 3).to(device) for _ in range(2))
    table, ctx = table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)
    keys = [gather(kc.cpu(), table[b].cpu(), n) for b, n in enumerate(lens)]
    values = [gather(vc.cpu(), table[b].cpu(), n) for b, n in enumerate(lens)]
    scale = dim ** -0.5
    q = rand(len(lens), hq, dim, dtype=dtype, device=device, g=g)
    got = paged_decode_attention(q, kc, vc, table, ctx, scale, num_splits=splits, min_tokens_per_split=4)
    want = oracle(q.cpu(), keys, values, [1] * len(lens), scale)
    torch.testing.assert_close(got.float().cpu(), want, **TOL[dtype])
    if splits == 1:
        q = rand(sum(q_lens), hq, dim, dtype=dtype, device=device, g=g)
        cu = torch.tensor([0, 3, 8, 9], dtype=torch.int32, device=device)
        got = paged_prefill_attention(q, kc, vc, table, ctx, cu, max(q_lens), scale)
        torch.testing.assert_close(got.float().cpu(), oracle(q.cpu(), keys, values, q_lens, scale), **TOL[dtype])
    with pytest.raises(TypeError, match="caches"):
        paged_decode_attention(q[:3], kc.view(torch.uint8), vc.view(torch.uint8), table, ctx, scale)


def fp8_kv_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):  # noqa: ANN001, ANN003, ANN201
    """HF's eager attention over keys and values rounded through float8_e4m3fn, as the engine caches them."""
    key, value = (rounded(t).to(t.dtype) for t in (key, value))
    return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


AttentionInterface.register("fp8_kv_eager", fp8_kv_attention)
AttentionMaskInterface.register("fp8_kv_eager", eager_mask)  # a custom attention gets no causal mask otherwise


@torch.no_grad()
def greedy_oracle(triple: tuple, prompt: list[int], steps: int, vocab: int, lam: float) -> list[int]:
    models = [AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32, attn_implementation="fp8_kv_eager")
              for p in triple]
    ids = list(prompt)
    for _ in range(steps):
        large, rl, base = (m(torch.tensor([ids])).logits[0, -1, :vocab] for m in models)
        ids.append(int((large + lam * (rl - base)).argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_an_fp8_kv_engine_decodes_as_hf_over_rounded_keys_and_values(qwen2_triple: tuple, kernels: str) -> None:
    """Greedy RAST over all three models' FP8 caches (prefill, prefix-cached second request, decode):
    HF's tokens when its attention rounds K and V the same way; the same memory holds 4x float32's tokens."""
    kw = dict(lam=0.7, device="cpu", dtype="float32", block_size=4, kv_cache_memory=1 << 20)
    if kernels == "triton":
        kw.update(attention_backend="triton", layer_ops="triton")
    llm = LLM(*map(str, qwen2_triple), kv_cache_dtype="fp8", **kw)
    engine = llm.llm_engine
    assert all(c.dtype == FP8 for pool in engine.runner.kv.pools for layer in pool for c in layer)
    plain = LLM(*map(str, qwen2_triple), **kw).llm_engine
    assert engine.runner.kv.num_blocks // 4 == plain.runner.kv.num_blocks  # float32's 4 bytes -> 1, same memory
    prompts = [[5, 9, 9, 17, 4, 9, 30, 2], [5, 9, 9, 17, 4, 9, 30, 2, 11]]  # the second hits the first's blocks
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    for prompt, got in zip(prompts, outs):
        assert got == greedy_oracle(qwen2_triple, prompt, 10, engine.vocab_size, 0.7)
    with pytest.raises(RastError, match="kv_cache_dtype"):
        LLM(*map(str, qwen2_triple), device="cpu", kv_cache_dtype="int8")
    with pytest.raises(RastError, match="flash_attn"):
        LLM(*map(str, qwen2_triple), device="cpu", kv_cache_dtype="fp8", attention_backend="flash_attn")


@pytest.mark.gpu
def test_fp8_kv_engine_on_gpu_equals_cpu(qwen2_triple: tuple) -> None:
    """The GPU's kernels (Triton attention and fused rotary store over FP8 caches, CUDA graphs, async
    scheduling), float32: the CPU spec's greedy tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = [[5, 9, 9, 17, 4, 9], [33, 2, 70, 70], [7, 30, 4]]
    runs = [[o.outputs[0].token_ids for o in LLM(*map(str, qwen2_triple), lam=0.7, device=device, dtype="float32",
                                                 block_size=4, kv_cache_blocks=64, kv_cache_dtype="fp8")
             .generate(prompts, params, use_tqdm=False)] for device in ("cpu", "cuda")]
    assert runs[0] == runs[1]
