"""Mixtures of experts through the engine, against HF transformers: the pairing RAST is used with (a
sparse large base, Qwen3-30B-A3B's shape, steered by a dense small Qwen3 pair sharing its tokenizer),
the fused Triton MoE kernels in a whole engine and in a captured decode step, FP8 experts, small MoE
models stacked into one forward, and what is refused."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from factories import make_model_dir, make_tokenizer
from rast_engine import LLM, SamplingParams
from rast_engine.errors import ModelLoadError
from rast_engine.attention.torch_backend import TorchAttention
from rast_engine.models import ModelConfig, load_model
from rast_engine.models.moe import SparseMoE
from rast_engine.sampling_params import sample_seed
from test_engine import LAM, PROMPTS, hf_greedy, hf_sampled
from test_fp8_models import dequantised_copy

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def sparse_large_dense_small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("moe_mixed")
    tok = make_tokenizer(root / "tok")
    large = make_model_dir(root / "large", "qwen3_moe", vocab_width=128, hidden=64, layers=3, intermediate=128,
                           seed=1, tie=False, tokenizer_dir=tok)
    small = dict(vocab_width=112, hidden=32, layers=2, intermediate=64, tie=True, tokenizer_dir=tok, head_dim=16)
    return (large, make_model_dir(root / "rl", "qwen3", seed=2, **small),
            make_model_dir(root / "base", "qwen3", seed=3, **small))


@pytest.mark.parametrize("layer_ops", ["torch", "triton"])
def test_sparse_large_dense_small_greedy_equals_hf(sparse_large_dense_small: tuple, layer_ops: str) -> None:
    """The fused kernels (interpreted) and the torch loop both give HF's greedy RAST tokens."""
    llm = LLM(*map(str, sparse_large_dense_small), lam=LAM, block_size=4, kv_cache_blocks=64, layer_ops=layer_ops)
    assert ModelConfig.from_dir(sparse_large_dense_small[0]).num_experts == 4
    for out in llm.generate(PROMPTS, GREEDY, use_tqdm=False):
        assert out.outputs[0].token_ids == hf_greedy(sparse_large_dense_small, out.prompt_token_ids, LAM,
                                                     llm.llm_engine.vocab_size, GREEDY.max_tokens)


def test_sampled_tokens_follow_the_moe_triples_distribution(sparse_large_dense_small: tuple) -> None:
    llm = LLM(*map(str, sparse_large_dense_small), lam=LAM, block_size=4, kv_cache_blocks=64)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=6, seed=11, ignore_eos=True)
    for o in llm.generate(PROMPTS[:2], params, use_tqdm=False):
        want = hf_sampled(sparse_large_dense_small, o.prompt_token_ids, LAM, llm.llm_engine.vocab_size, 6,
                          sample_seed(11, 0), params)
        assert o.outputs[0].token_ids == want


@pytest.mark.parametrize("method", ["coupled", "rejection"])
def test_speculative_rounds_verified_by_a_sparse_large_model_give_the_plain_tokens(sparse_large_dense_small: tuple,
                                                                                    method: str) -> None:
    """M verifies γ + 1 positions a round through its experts (a multi-token MoE step in decode): greedy
    requests give plain decoding's tokens either way, seeded sampled ones with the coupled method."""
    kw = dict(lam=LAM, block_size=4, kv_cache_blocks=64)
    params = [GREEDY, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=3, ignore_eos=True)]
    plain = LLM(*map(str, sparse_large_dense_small), **kw)
    spec = LLM(*map(str, sparse_large_dense_small), speculative_tokens=3, speculative_method=method, **kw)
    for p in params[:2 if method == "coupled" else 1]:
        want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, p, use_tqdm=False)]
        assert [o.outputs[0].token_ids for o in spec.generate(PROMPTS, p, use_tqdm=False)] == want
    assert spec.llm_engine.stats().spec_draft_tokens_total > 0


def test_small_moe_models_stacked_equal_them_unstacked_and_hf(mixtral_triple: tuple) -> None:
    """A sparse pair stacked into one forward (one router GEMM, one fused call over both models' experts)
    decodes as the two models run alone, and as HF's greedy loop."""
    outs = []
    for stack in (True, False):
        llm = LLM(*map(str, mixtral_triple), lam=LAM, block_size=4, kv_cache_blocks=64, stack_small_models=stack)
        assert len(llm.llm_engine.runner.units) == (2 if stack else 3)
        results = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        outs.append([o.outputs[0].token_ids for o in results])
    prompt_ids = [o.prompt_token_ids for o in results]
    assert outs[0] == outs[1]
    for ids, got in zip(prompt_ids, outs[0]):
        assert got == hf_greedy(mixtral_triple, ids, LAM, llm.llm_engine.vocab_size, GREEDY.max_tokens)


def test_fp8_experts_decode_as_the_dequantised_checkpoint(sparse_large_dense_small: tuple, tmp_path: Path) -> None:
    """quantization="fp8" stores a sparse large model's experts (and attention) in FP8, its router in the
    model dtype: greedy tokens and logprobs are those of the dequantised checkpoint run plainly (the FP8
    kernels: tests/test_moe_kernel.py, and the model with Triton layer ops: tests/test_fp8_models.py)."""
    large, rl, base = map(str, sparse_large_dense_small)
    oracle = dequantised_copy(Path(large), tmp_path / "dequantised")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    runs = []
    for m, quantization in ((large, "fp8"), (str(oracle), None)):
        llm = LLM(m, rl, base, lam=LAM, dtype="float32", block_size=4, kv_cache_blocks=64, quantization=quantization)
        runs.append([(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(PROMPTS, params,
                                                                                          use_tqdm=False)])
    sparse = [layer.mlp for layer in llm.llm_engine.runner.units[0].layers if isinstance(layer.mlp, SparseMoE)]
    assert sparse and all(m.fp8_experts is None for m in sparse)  # the oracle's, unquantised
    for (ids, lps), (want_ids, want_lps) in zip(*runs):
        assert ids == want_ids
        assert all(abs(a[t] - b[t]) < 1e-4 for a, b in zip(lps, want_lps) for t in a)


def test_dummy_weights_route_and_decode(qwen3_moe_triple: tuple) -> None:
    """load_format="dummy" (the benchmarks') fills the experts too: finite logits, tokens in range."""
    model = load_model(qwen3_moe_triple[0], device="cpu", dtype="float32", attention=TorchAttention(),
                       load_format="dummy", seed=3)
    sparse = [layer.mlp for layer in model.layers if isinstance(layer.mlp, SparseMoE)]
    assert len(sparse) == 2 and all(torch.isfinite(m.experts_gate_up).all() and m.experts_gate_up.std() > 0
                                    for m in sparse)
    llm = LLM(str(qwen3_moe_triple[0]), load_format="dummy", block_size=4, kv_cache_blocks=32)
    out = llm.generate(["the cat"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert len(out) == GREEDY.max_tokens and all(0 <= t < llm.llm_engine.vocab_size for t in out)


@pytest.mark.parametrize("edit, match", [
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ({"hidden_act": "gelu_pytorch_tanh"}, "silu"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step"),  # transformers divides by it
    ({"decoder_sparse_step": None}, "decoder_sparse_step"),
])
def test_unsupported_moe_configs_are_refused(qwen3_moe_triple: tuple, edit: dict, match: str) -> None:
    cfg = {**json.loads((qwen3_moe_triple[0] / "config.json").read_text()), **edit}
    with pytest.raises(ModelLoadError, match=match):
        ModelConfig.from_dict(cfg)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU runs only (Triton interpreter)")
def test_moe_decode_step_captures_and_replays_as_a_graph(qwen3_moe_triple: tuple,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the CUDA emulator (tests/cuda_emulator.py): the fused MoE's routing sort and kernels run in a
    captured decode step with no host read, on two model streams, and the replays give the eager engine's
    tokens (the small MoE pair stacked)."""
    from test_emulated_fast_path import assert_replays_equal_eager

    assert_replays_equal_eager(qwen3_moe_triple, monkeypatch, [1, 2])


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_gpu_moe_engine_equals_cpu(sparse_large_dense_small: tuple, quantization: object) -> None:
    """A sparse large model on the GPU (Triton routing and expert kernels, in CUDA graphs; its experts in
    FP8 too, against the CPU's spec over the same FP8 weights): the CPU's greedy tokens, float32."""
    kw = dict(lam=LAM, dtype="float32", block_size=4, kv_cache_blocks=64, quantization=quantization)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    cpu = LLM(*map(str, sparse_large_dense_small), device="cpu", **kw)
    gpu = LLM(*map(str, sparse_large_dense_small), device="cuda", attention_backend="triton", **kw)
    assert gpu.llm_engine.runner.graphs is not None
    assert ([o.outputs[0].token_ids for o in gpu.generate(PROMPTS, params, use_tqdm=False)] ==
            [o.outputs[0].token_ids for o in cpu.generate(PROMPTS, params, use_tqdm=False)])
