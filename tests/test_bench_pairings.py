"""bench/decode.py's pairings beyond the dense tiny one, on the CPU: a mixture of experts as the large
model (tiny-moe) and the RL model as a LoRA adapter sharing its base's weights (tiny-lora), each through
the suite's modes with a roofline counted by hand."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench_runs import load_bench, run_bench

decode = load_bench("decode.py")  # puts the repo root on sys.path, so the suite's sibling modules import
from bench import decode_runs  # noqa: E402


def test_a_moe_pairing_runs_every_mode_with_a_roofline_of_the_experts_it_reaches(tmp_path: Path) -> None:
    """The tiny mixture-of-experts pairing (qwen3-30b-a3b+1.7b's shape of run): every mode, the HF peer's
    Qwen3-MoE and the FP8 experts included, and a roofline whose weight bytes grow with the experts a
    batch reaches (float32: four bytes a weight)."""
    result, _, _ = run_bench("decode.py", tmp_path, "--tiny", "--quick", "--device", "cpu", "--pairings", "tiny-moe",
                             "--commit", "moesmoke", pattern="decode-*-moesmoke.json", env={"HF_HUB_OFFLINE": "1"},
                             timeout=240)
    assert result["errors"] == [] and {r["mode"] for r in result["rows"]} == set(decode.MODES)
    large = decode.TINY["tiny-moe-large"]
    for r in result["rows"]:
        if r["mode"] == "base":
            assert r["weight_bytes_read"] == decode.param_counts(large, r["batch"])[1] * 4
    base = {r["batch"]: r["weight_bytes_read"] for r in result["rows"] if r["mode"] == "base"}
    assert base[4] > base[1]


def test_a_lora_pairing_reads_the_shared_base_once_in_its_roofline(tmp_path: Path) -> None:
    """tiny-lora: the RL model a LoRA adapter (rank 8, every projection) over the small base, written as PEFT
    writes one. Its rast rows count M, S and the adapter (S once); the HF peer, which would need peft, is
    skipped by name."""
    result, _, _ = run_bench("decode.py", tmp_path, "--tiny", "--quick", "--device", "cpu", "--pairings", "tiny-lora",
                             "--modes", "base", "rast", "hf-rast", "--commit", "lorasmoke",
                             pattern="decode-*-lorasmoke.json", env={"HF_HUB_OFFLINE": "1"}, timeout=240)
    assert result["errors"] == [] and [s["mode"] for s in result["skipped"]] == ["hf-rast"]
    large, small = decode.TINY["tiny-large"], decode.TINY["tiny-small"]
    h, i, layers = small["hidden_size"], small["intermediate_size"], small["num_hidden_layers"]
    kv = small["num_key_value_heads"] * h // small["num_attention_heads"]
    # a fused projection's B spans its rows for every part (block-diagonal: zeros a GEMM reads too)
    adapter = layers * 8 * (3 * (h + h + 2 * kv) + (h + h) + 2 * (h + 2 * i) + (i + h))
    for r in result["rows"]:
        want = decode.param_counts(large)[1] + (decode.param_counts(small)[1] + adapter if r["mode"] == "rast" else 0)
        assert r["weight_bytes_read"] == want * 4  # float32 on the CPU


@pytest.mark.parametrize("stack", [True, False])
def test_output_heads_give_a_shared_head_once(tmp_path: Path, stack: bool) -> None:
    """--logit-std scales each output head in place: a LoRA adapter's model shares its base's head, so the
    head is listed (and scaled) once, stacked (an expanded view) or not."""
    from bench.decode_configs import materialize
    from rast_engine import EngineConfig, LLMEngine

    dirs, _ = materialize("tiny-lora", tmp_path)
    engine = LLMEngine(EngineConfig(model=str(dirs[0]), small_rl=str(dirs[1]), small_base=str(dirs[2]),
                                    load_format="dummy", kv_cache_blocks=16, stack_small_models=stack))
    heads = decode_runs.output_heads(engine)
    assert len(heads) == 2 and len({h.untyped_storage().data_ptr() for h in heads}) == 2
    before = [h.clone() for h in heads]
    decode_runs.peak_logits(heads, 5.0)  # in place, each once: no error on an expanded view
    assert all(torch.allclose(h, b * (5.0 / (0.02 * h.shape[-1] ** 0.5))) for h, b in zip(heads, before))


def test_adapters_per_request_count_every_served_adapter_in_the_floor(tmp_path: Path) -> None:
    """bench/lora_modules.py --quick: the single adapter as small_rl, then 1 and 2 adapters served; each
    served adapter adds its A and B (rank 8, every projection) to the bytes a step reads."""
    result, _, _ = run_bench("lora_modules.py", tmp_path, "--quick", pattern="lora-modules-*.json",
                             env={"RAST_COMMIT": "lmsmoke"}, timeout=240)
    rows = {(r["mode"], r["adapters"]): r for r in result["rows"]}
    assert sorted(rows) == [("lora_modules", 1), ("lora_modules", 2), ("small_rl", 1)]
    small = decode.TINY["tiny-small"]
    h, i, layers = small["hidden_size"], small["intermediate_size"], small["num_hidden_layers"]
    kv = small["num_key_value_heads"] * h // small["num_attention_heads"]
    # a fused projection's B spans its rows for every part (block-diagonal: zeros a GEMM reads too)
    adapter = layers * 8 * (3 * (h + h + 2 * kv) + (h + h) + 2 * (h + 2 * i) + (i + h))
    one, two = rows[("lora_modules", 1)], rows[("lora_modules", 2)]
    assert rows[("small_rl", 1)]["weight_bytes_read"] == one["weight_bytes_read"]
    assert two["weight_bytes_read"] - one["weight_bytes_read"] == adapter * 4  # float32 on the CPU
    assert all(r["tokens_per_s"] > 0 and r["step_ms"] > 0 for r in result["rows"])
    # the reload of the second adapter: its A and B, each part's own rows of B only, written into one slot
    delta = layers * 8 * (3 * h + (h + 2 * kv) + h + h + 2 * h + 2 * i + i + h)
    loads = result["loads"]
    assert loads["bytes"] == delta * 4 and loads["cold_host_ms"] > 0 and loads["warm_host_ms"] > 0


@pytest.mark.parametrize("slots", [0, 2])
def test_the_adapter_bytes_counted_are_the_engines_lora_tensors(tmp_path: Path, slots: int) -> None:
    """bench/roofline.py's count of an adapter (and of N slots) equals the elements of every LoraLinear's A
    and B in the engine's R: one adapter as small_rl (block-diagonal B), or lora_modules' slots."""
    from bench.decode_configs import materialize
    from rast_engine import EngineConfig, LLMEngine
    from rast_engine.models.lora import LoraLinear

    dirs, cfgs = materialize("tiny-lora", tmp_path)
    pair = (dict(small_rl=str(dirs[1])) if not slots else
            dict(lora_modules={"a": str(dirs[1])}, max_loras=slots))
    engine = LLMEngine(EngineConfig(model=str(dirs[0]), small_base=str(dirs[2]), load_format="dummy",
                                    kv_cache_blocks=16, stack_small_models=False, **pair))
    rl = engine.model_set.models[1]
    held = sum(m.lora_a.numel() + m.lora_b.numel() for m in rl.modules() if isinstance(m, LoraLinear))
    assert held == decode.param_counts({**cfgs[1], "lora_rank": cfgs[1]["lora_rank"] * max(slots, 1)})[1]
    if slots:  # rast_kernels.lora_slots reads a used slot's A and the diagonal blocks of its B
        diagonal = sum(m.lora_a.numel() + m.lora_b.shape[0] * m.max_loras * m.slot_width // len(m.part_starts)
                       for m in rl.modules() if isinstance(m, LoraLinear))
        cfg = {**cfgs[1], "lora_rank": cfgs[1]["lora_rank"] * slots, "lora_gathered": True}
        assert decode.param_counts(cfg) == (held, diagonal) and diagonal < held
        one = decode.param_counts({**cfg, "lora_read_rank": cfgs[1]["lora_rank"]})  # a batch using one slot
        assert one == (held, diagonal // slots)
