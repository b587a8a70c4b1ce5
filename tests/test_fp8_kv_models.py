"""kv_cache_dtype="fp8" in whole models: the engine's greedy tokens over FP8 caches (every model of a
triple, and a large model whose keys and values run past ±448 as Qwen2.5's do) against HF transformers'
forward with an attention function that passes its keys and values through the same quantisation
(rast_kernels.fp8_kv's, a power-of-two scale per (token, KV head)); and the GPU's against the CPU's.
The stores and kernels themselves: test_fp8_kv_cache."""
from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

from rast_engine import LLM, SamplingParams
from rast_engine.errors import RastError
from rast_kernels.fp8_kv import fake_quantize

FP8 = torch.float8_e4m3fn


def fp8_kv_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):  # noqa: ANN001, ANN003, ANN201
    """HF's eager attention over keys and values through the FP8 cache's quantisation, a scale per (token,
    head) row, as the engine caches them."""
    key, value = fake_quantize(key), fake_quantize(value)
    return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def saturated_fp8_kv_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):  # noqa: ANN001, ANN003, ANN201
    """HF's eager attention over keys and values rounded to float8 unscaled, saturating at ±448."""
    key, value = (t.float().clamp(-448, 448).to(FP8).to(t.dtype) for t in (key, value))
    return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


for _name, _attention in (("fp8_kv_eager", fp8_kv_attention), ("saturated_fp8_kv_eager", saturated_fp8_kv_attention)):
    AttentionInterface.register(_name, _attention)
    AttentionMaskInterface.register(_name, eager_mask)  # a custom attention gets no causal mask otherwise


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
def test_an_fp8_kv_engine_decodes_as_hf_over_quantised_keys_and_values(qwen2_triple: tuple, kernels: str) -> None:
    """Greedy RAST over all three models' FP8 caches (prefill, prefix-cached second request, decode):
    HF's tokens when its attention quantises K and V the same way; the same memory holds 3.2x float32's
    tokens (a block of 4 tokens: 4 value rows and 1 scale row of one byte, against 4 rows of four)."""
    kw = dict(lam=0.7, device="cpu", dtype="float32", block_size=4, kv_cache_memory=1 << 20)
    if kernels == "triton":
        kw.update(attention_backend="triton", layer_ops="triton")
    llm = LLM(*map(str, qwen2_triple), kv_cache_dtype="fp8", **kw)
    engine = llm.llm_engine
    assert all(c.dtype == FP8 for pool in engine.runner.kv.pools for layer in pool for c in layer)
    plain = LLM(*map(str, qwen2_triple), **kw).llm_engine
    per_block = [kv.bytes // kv.num_blocks for kv in (engine.runner.kv, plain.runner.kv)]
    assert per_block[0] * 16 == per_block[1] * 5 and engine.runner.kv.num_blocks == (1 << 20) // per_block[0]
    prompts = [[5, 9, 9, 17, 4, 9, 30, 2], [5, 9, 9, 17, 4, 9, 30, 2, 11]]  # the second hits the first's blocks
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    for prompt, got in zip(prompts, outs):
        assert got == greedy_oracle(qwen2_triple, prompt, 10, engine.vocab_size, 0.7)
    with pytest.raises(RastError, match="kv_cache_dtype"):
        LLM(*map(str, qwen2_triple), device="cpu", kv_cache_dtype="int8")
    with pytest.raises(RastError, match="flash_attn"):
        LLM(*map(str, qwen2_triple), device="cpu", kv_cache_dtype="fp8", attention_backend="flash_attn")


@pytest.fixture(scope="module")
def biased_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Qwen2 whose k_proj and v_proj biases put some key channels near 900 and a value channel
    near 1200, past e4m3's 448, as Qwen2.5's k biases do (queries and that channel's output columns
    scaled down so neither swamps the rest)."""
    from factories import make_model_dir

    path = make_model_dir(tmp_path_factory.mktemp("biased"), "qwen2", vocab_width=128, hidden=64, heads=4,
                          intermediate=128, seed=7, tie=False)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias[::5] += 900.0
            layer.self_attn.v_proj.bias[1] += 1200.0
            layer.self_attn.q_proj.weight.mul_(0.05)
            layer.self_attn.o_proj.weight[:, [1, 17]] *= 1e-3  # the value channel, in query heads 0 and 1
    model.save_pretrained(str(path))
    return str(path)


def test_keys_and_values_past_448_decode_as_hf_over_quantised_ones(biased_model: str) -> None:
    """The large model alone, keys and values past ±448 in every layer: the engine's greedy tokens are
    HF's with the same quantisation, and the cache holds scales above 1 (exponent bytes over 127). The
    first tokens are exact attention's too, where a saturating cache already differs at the first."""
    llm = LLM(biased_model, device="cpu", dtype="float32", block_size=4, kv_cache_blocks=32, kv_cache_dtype="fp8")
    prompt = [5, 9, 9, 17, 4, 9, 30, 2, 11]
    got = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    runs = {}
    for attention in ("fp8_kv_eager", "eager", "saturated_fp8_kv_eager"):
        hf = AutoModelForCausalLM.from_pretrained(biased_model, dtype=torch.float32, attn_implementation=attention)
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1, :llm.llm_engine.vocab_size].argmax()))
        runs[attention] = ids[len(prompt):]
    assert got == runs["fp8_kv_eager"]
    assert got[:3] == runs["eager"][:3] and runs["saturated_fp8_kv_eager"][0] != got[0], runs
    k_cache = llm.llm_engine.runner.kv.pools[0][0][0]
    assert int(k_cache.view(torch.uint8)[:, 4].max()) > 127  # row 4 of each block: its exponent bytes


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
