"""quantization="fp8" (engine/models/fp8.py): the large model's projections as FP8 weights. The oracle is
HF transformers' forward over the same checkpoint with each projection tensor replaced by its FP8
dequantisation (rast_kernels.fp8_linear.quantize_fp8 per HF tensor, as the loader quantises each part
of a fused projection): the models must agree to float32 rounding, on both LayerOps backends."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from factories import make_model_dir, make_tokenizer
from rast_engine import LLM, SamplingParams
from rast_engine.attention.torch_backend import TorchAttention
from rast_engine.errors import ModelLoadError, RastError
from rast_engine.models import ModelConfig, load_model
from rast_engine.models.fp8 import Fp8Linear
from rast_engine.models.layer_ops import get_layer_ops
from rast_kernels.fp8_linear import FP8, dequantize_fp8, quantize_fp8
from test_models import ATOL, MODEL_CASES, run_paged

# Mixtral's experts: w1 (gate), w3 (up), w2 (down); a router ("gate") keeps the model dtype
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")


def fp8_storages(cfg: ModelConfig) -> int:
    """Fp8Linear modules a quantised model holds: q/k/v and o a layer, gate/up and down of a dense MLP, of a
    sparse block's experts (stored as one each) and of its shared expert."""
    sparse = sum(cfg.moe_layers) if cfg.num_experts else 0
    return cfg.num_layers * 4 + sparse * (2 if cfg.shared_expert_intermediate_size else 0)


@pytest.fixture(scope="module", params=sorted(MODEL_CASES))
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = make_tokenizer(tmp_path_factory.mktemp("tok"))
    return make_model_dir(tmp_path_factory.mktemp(request.param), seed=7, tokenizer_dir=tok, **MODEL_CASES[request.param])


def dequantised_copy(src: Path, dst: Path) -> Path:
    """``src`` with every decoder projection replaced by its FP8 dequantisation (float32)."""
    shutil.copytree(src, dst)
    for file in dst.glob("*.safetensors"):
        tensors = load_file(str(file))
        for name, t in tensors.items():
            if name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS:
                tensors[name] = dequantize_fp8(*quantize_fp8(t)).to(t.dtype)
        save_file(tensors, str(file))
    return dst


@pytest.mark.parametrize("ops", ["torch", "triton"])
def test_fp8_model_equals_hf_on_the_dequantised_weights(model_dir: Path, tmp_path: Path, ops: str) -> None:
    model = load_model(model_dir, device="cpu", dtype="float32", attention=TorchAttention(),
                       ops=get_layer_ops(ops, "cpu"), quantization="fp8")
    linears = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(linears) == fp8_storages(model.config) and all(m.weight.dtype == FP8 for m in linears)
    assert all(m.backend == ops for m in linears)
    oracle = dequantised_copy(model_dir, tmp_path / "dequantised")
    hf = AutoModelForCausalLM.from_pretrained(str(oracle), dtype=torch.float32, attn_implementation="eager")
    plain = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 100, (n,), generator=gen).tolist() for n in (11, 10)]
    for seq, logits in zip(seqs, run_paged(model, seqs, [[5, 2], [2, 4]])):
        with torch.no_grad():
            want, unquantised = (m(torch.tensor([seq])).logits[0] for m in (hf, plain))
        torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
        assert (logits - unquantised).abs().max() > 10 * ATOL  # FP8 did change the weights


def test_fp8_weights_take_half_the_bytes_and_load_like_dummy_ones(model_dir: Path) -> None:
    kw = dict(device="cpu", dtype="bfloat16", attention=TorchAttention())
    plain, fp8 = (load_model(model_dir, **kw, quantization=q) for q in (None, "fp8"))
    proj = lambda m: sum(t.numel() * t.element_size() for n, t in m.state_dict().items()  # noqa: E731
                         if "proj.weight" in n or "experts" in n and not n.endswith("scale"))
    assert proj(fp8) * 2 == proj(plain)
    dummy = load_model(model_dir, **kw, quantization="fp8", load_format="dummy", seed=3)
    for m in (x for x in dummy.modules() if isinstance(x, Fp8Linear)):
        w = dequantize_fp8(m.weight, m.scale)
        assert m.weight.dtype == FP8 and 0.01 < w.std() < 0.03  # N(0, 0.02), quantised
    with pytest.raises(ModelLoadError, match="quantization"):
        load_model(model_dir, **kw, quantization="int4")


def test_an_fp8_engine_decodes_as_the_dequantised_checkpoint(qwen2_triple: tuple, tmp_path: Path) -> None:
    """quantization="fp8" quantises the large model only: its greedy RAST tokens and logprobs are those of
    a plain engine over the large model's dequantised copy with the same small pair."""
    large, rl, base = map(str, qwen2_triple)
    oracle = dequantised_copy(Path(large), tmp_path / "large-dequantised")
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    prompts = [[5, 9, 9, 17, 4, 9], [33, 2, 70, 70]]
    runs = []
    for m, quantization in ((large, "fp8"), (str(oracle), None)):
        llm = LLM(m, rl, base, lam=0.7, device="cpu", dtype="float32", block_size=4, kv_cache_blocks=64,
                  quantization=quantization)
        runs.append([(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params,
                                                                                          use_tqdm=False)])
        small = llm.llm_engine.runner.units[1:]
        assert not any(isinstance(x, Fp8Linear) for u in small for x in u.modules())
    for (ids, lps), (want_ids, want_lps) in zip(*runs):
        assert ids == want_ids
        for got, want in zip(lps, want_lps):
            assert got.keys() == want.keys() and all(abs(got[t] - want[t]) < 1e-4 for t in got)
    with pytest.raises(RastError, match="quantization"):
        LLM(large, rl, base, device="cpu", quantization="fp4")


@pytest.mark.gpu
def test_fp8_engine_on_gpu_equals_cpu(qwen2_triple: tuple) -> None:
    """The Triton FP8 kernel compiled for the GPU (float32: exact dots), inside CUDA graphs, async
    scheduling and the fused layer ops, or the torch layer ops (the FP8 linear stays Triton's on CUDA):
    the CPU spec's greedy tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = [[5, 9, 9, 17, 4, 9], [33, 2, 70, 70], [7, 30, 4]]
    runs = []
    for device, ops in (("cpu", "auto"), ("cuda", "auto"), ("cuda", "torch")):
        llm = LLM(*map(str, qwen2_triple), lam=0.7, device=device, dtype="float32", block_size=4,
                  kv_cache_blocks=64, quantization="fp8", layer_ops=ops)
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        linears = [m for m in llm.llm_engine.runner.units[0].modules() if isinstance(m, Fp8Linear)]
        assert linears and all(m.backend == ("triton" if device == "cuda" else "torch") for m in linears)
    assert runs[0] == runs[1] == runs[2]
