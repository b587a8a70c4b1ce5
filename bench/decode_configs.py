"""The model triples the decode suite runs (bench/decode.py): each pairing's large model and small pair
as config.json files of real checkpoints' shapes (bench/configs/) or of tiny ones for CPU runs; the
weights are random, so nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
PAIRINGS = {"7b+1.5b": ("qwen2.5-7b", "qwen2.5-1.5b"), "14b+7b": ("qwen2.5-14b", "qwen2.5-7b"),
            "32b+7b": ("qwen2.5-32b", "qwen2.5-7b"), "qwen3-8b+1.7b": ("qwen3-8b", "qwen3-1.7b"),
            "qwen3-30b-a3b+1.7b": ("qwen3-30b-a3b", "qwen3-1.7b")}
_TINY_BASE = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
              "hidden_act": "silu", "max_position_embeddings": 1024, "tie_word_embeddings": False,
              "torch_dtype": "float32", "bos_token_id": 0, "eos_token_id": 1}
# the small pair's vocab is narrower than the large model's, like Qwen2.5-1.5B (151936) vs 7B (152064)
TINY = {"tiny-large": {**_TINY_BASE, "hidden_size": 128, "intermediate_size": 256, "vocab_size": 512},
        "tiny-small": {**_TINY_BASE, "hidden_size": 64, "intermediate_size": 128, "vocab_size": 496},
        # a mixture of experts as the large model (as qwen3-30b-a3b+1.7b): eight experts, two a token
        "tiny-moe-large": {**_TINY_BASE, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
                           "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
                           "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True, "head_dim": 32,
                           "vocab_size": 512}}
TINY_PAIRINGS = {"tiny": ("tiny-large", "tiny-small"), "tiny-moe": ("tiny-moe-large", "tiny-small"),
                 "tiny-lora": ("tiny-large", "tiny-small")}
# the RL model as a LoRA adapter over its base (engine/models/lora.py), of this rank on every projection:
# stacked with the base, the pair reads the base's weights once
LORA_PAIRINGS = {"7b+1.5b-lora": ("7b+1.5b", 64), "tiny-lora": ("tiny", 8)}
LORA_TARGETS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def pairing_models(pairing: str) -> tuple[str, str]:
    """(large, small) config names: bench/configs/<name>.json or TINY."""
    if pairing in TINY_PAIRINGS:
        return TINY_PAIRINGS[pairing]
    return PAIRINGS[LORA_PAIRINGS[pairing][0]] if pairing in LORA_PAIRINGS else PAIRINGS[pairing]


def materialize(pairing: str, tmp: Path) -> tuple[list[Path], list[dict]]:
    """config.json of the large model, the RL model and its base (same shapes) in temp dirs."""
    large, small = pairing_models(pairing)
    dirs, cfgs = [], []
    for role, name in (("large", large), ("rl", small), ("base", small)):
        cfg = TINY[name] if name in TINY else json.loads((CONFIGS / f"{name}.json").read_text())
        d = tmp / f"{pairing}-{role}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg))
        dirs.append(d)
        cfgs.append(cfg)
    if pairing in LORA_PAIRINGS:
        rank = LORA_PAIRINGS[pairing][1]
        (dirs[1] / "config.json").unlink()
        write_adapter(dirs[1], dirs[2], cfgs[2], rank)
        cfgs[1] = {**cfgs[2], "lora_rank": rank}  # bench/roofline.py counts the adapter's weights alone
    return dirs, cfgs


def write_adapter(path: Path, base: Path, cfg: dict, rank: int, seed: int = 0) -> None:
    """A PEFT LoRA adapter directory over ``base``: random A and B of ``rank`` on every projection."""
    import torch
    from safetensors.torch import save_file

    from rast_engine.models.config import ModelConfig

    m = ModelConfig.from_dict(cfg)
    shapes = {"q_proj": (m.hidden_size, m.q_size), "k_proj": (m.hidden_size, m.kv_size),
              "v_proj": (m.hidden_size, m.kv_size), "o_proj": (m.q_size, m.hidden_size),
              "gate_proj": (m.hidden_size, m.intermediate_size), "up_proj": (m.hidden_size, m.intermediate_size),
              "down_proj": (m.intermediate_size, m.hidden_size)}
    g = torch.Generator().manual_seed(rank + 1000 * seed)
    tensors = {}
    for layer in range(m.num_layers):
        for block, names in LORA_TARGETS.items():
            for name in names:
                n_in, n_out = shapes[name]
                pre = f"base_model.model.model.layers.{layer}.{block}.{name}."
                tensors[pre + "lora_A.weight"] = torch.randn(rank, n_in, generator=g).mul_(n_in ** -0.5).bfloat16()
                tensors[pre + "lora_B.weight"] = torch.randn(n_out, rank, generator=g).mul_(0.01).bfloat16()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "base_model_name_or_path": str(base),
         "target_modules": [n for names in LORA_TARGETS.values() for n in names]}))
