"""What a decode step runs on the device, counted on the CPU with every kernel interpreted: at batch 1 a
step's time is its launches, so each stray op is a regression. One Qwen2 layer with the fused layer ops
and Triton attention is 9 kernels (4 GEMMs, 2 norms, rotary with the KV store, attention, activation;
the plain torch ops issue about 35 more). A whole RAST step of the engine is the large model's embedding
gather, layers, final norm and lm_head; the same for the (rl, base) pair run as one forward (a layer is
9 kernels for both models), plus 10 small ops building its doubled metadata; then the sampler's four
kernels, and two copies for token feedback (the input ids gathered through DecodeBuffers' token_src, the
sampled ids kept for the next step): nothing else."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from device_ops import count_device_ops
from factories import make_model_dir
from rast_engine import EngineConfig, LLMEngine, SamplingParams
from rast_engine.attention.triton_backend import TritonAttention
from rast_engine.models import load_model
from rast_engine.models.layer_ops import get_layer_ops
from rast_engine.models.stacked import StackedCausalLM
from test_models import BLOCK, make_meta

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="counts interpreted launches (CPU only)")
GEMMS = ("linear", "addmm", "mm")  # how a projection dispatches depends on the grad mode and bias


def _gemms(ops: Counter) -> int:
    return sum(ops.pop(name, 0) for name in GEMMS)


def test_fused_decode_layer_launches_nine_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(make_model_dir(tmp_path, layers=2), device="cpu", dtype="bfloat16",
                       attention=TritonAttention(), ops=get_layer_ops("triton", "cpu"))
    shape = model.config.kv_cache_shape(4, BLOCK)
    caches = [(torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16)) for _ in range(2)]
    meta, positions = make_meta([(5, 1)], [[0, 1]], is_prefill=False)
    with torch.no_grad():
        h, residual = model.layers[0](model.embed_tokens(torch.tensor([3])), None, positions, meta, caches[0])
        with count_device_ops(monkeypatch) as ops:
            model.layers[1](h, residual, positions, meta, caches[1])
    assert _gemms(ops) == 4
    assert dict(ops) == {"_rms_norm_kernel": 2, "_rotary_kernel": 1, "_decode_kernel": 1, "_act_mul_kernel": 1}
    wrong = torch.zeros(4, BLOCK * 2, *shape[2:], dtype=torch.bfloat16)  # slots would index other blocks
    with torch.no_grad(), pytest.raises(ValueError, match="block_size"):
        model.layers[1](h, residual, positions, meta, (wrong, wrong.clone()))
    assert not wrong.any()  # refused before the fused store wrote anything


def test_rast_decode_step_is_gemms_and_rast_kernels(qwen2_triple: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    large, rl, base = map(str, qwen2_triple)
    engine = LLMEngine(EngineConfig(model=large, small_rl=rl, small_base=base, lam=0.6, device="cpu",
                                    attention_backend="triton", layer_ops="triton", enforce_eager=True,
                                    block_size=4, kv_cache_blocks=64, max_num_seqs=4, max_model_len=64))
    engine.runner.sampler = "triton"  # the CUDA default; on the CPU the native sampler would run
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=6, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"r{i}", [5 + i, 6, 7, 8, 9], params)
    engine.step()  # prefill
    engine.step()  # a first decode step: lazy one-time work done
    with count_device_ops(monkeypatch) as ops:
        engine.step()
    large, pair = engine.runner.units
    assert isinstance(pair, StackedCausalLM)  # the (rl, base) pair: one forward over a doubled batch
    n, m = len(large.layers), len(pair.layers)
    assert _gemms(ops) == 4 * n + 1 + 2  # q/k/v, o, gate/up, down per layer, lm_head; the pair's 2 lm_heads
    # the pair's projections are one batched GEMM each (q/k/v with its bias), both models at once
    assert (ops.pop("baddbmm"), ops.pop("bmm")) == (m, 3 * m)
    # its metadata for 2B sequences (stacked_metadata) and 2T positions: device ops, no host sync
    assert {k: ops.pop(k) for k in ("repeat", "ge", "where", "add", "cat")} == dict(repeat=2, ge=1, where=1, add=3,
                                                                                   cat=3)
    # index_select: the input ids gathered from host-written and fed rows; clamp: the sampled ids stored
    # for the next step's feed (a -1 clamped: DecodeBuffers.store_sampled)
    assert dict(ops) == {"index_select": 1, "clamp": 1, "embedding": 1, "index": 1, "_rms_norm_kernel": 2 * (n + m) + 2,
                         "_rotary_kernel": n + m, "_decode_kernel": n + m, "_act_mul_kernel": n + m,
                         "_stats": 1, "_select": 1, "_draw": 1, "_finish": 1}


def test_a_step_of_adapters_chosen_per_request_adds_two_kernels_a_projection(lora_adapters: tuple,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """R with LoRA slots stacked on S (engine/lora_registry.py): the pair's projections are one GEMM over both
    models' rows each, and R's rows add rast_kernels.lora_slots' shrink and expand kernels (each reading
    only the slots the step's tokens use), with no mask or other op per projection; the shared lm_head is
    one GEMM whose two halves are copied out."""
    large, base, modules = lora_adapters
    engine = LLMEngine(EngineConfig(model=str(large), small_base=str(base), lora_modules=modules, lam=0.6,
                                    device="cpu", attention_backend="triton", layer_ops="triton", enforce_eager=True,
                                    block_size=4, kv_cache_blocks=64, max_num_seqs=4, max_model_len=64))
    engine.runner.sampler = "triton"
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=6, ignore_eos=True)
    for i, lora in enumerate(["math", None, "code"]):
        engine.add_request(f"r{i}", [5 + i, 6, 7, 8, 9], params, lora_request=lora)
    engine.step()
    engine.step()
    with count_device_ops(monkeypatch) as ops:
        engine.step()
    n, m = (len(u.layers) for u in engine.runner.units)
    assert (ops.pop("linear"), ops.pop("mm")) == (4 * n + 4 * m, 2)  # every projection once; the two lm_heads
    assert (ops.pop("_shrink_kernel"), ops.pop("_expand_kernel")) == (4 * m, 4 * m)
    assert (ops.pop("where"), ops.pop("copy_")) == (1, 2)  # the metadata's; the lm_head halves
    assert {k: ops.pop(k) for k in ("repeat", "ge", "add", "cat")} == dict(repeat=2, ge=1, add=3, cat=3)
    assert dict(ops) == {"index_select": 1, "clamp": 1, "embedding": 1, "index": 1, "_rms_norm_kernel": 2 * (n + m) + 2,
                         "_rotary_kernel": n + m, "_decode_kernel": n + m, "_act_mul_kernel": n + m,
                         "_stats": 1, "_select": 1, "_draw": 1, "_finish": 1}
