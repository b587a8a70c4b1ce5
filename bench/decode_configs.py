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
TINY_PAIRINGS = {"tiny": ("tiny-large", "tiny-small"), "tiny-moe": ("tiny-moe-large", "tiny-small")}


def pairing_models(pairing: str) -> tuple[str, str]:
    """(large, small) config names: bench/configs/<name>.json or TINY."""
    return TINY_PAIRINGS[pairing] if pairing in TINY_PAIRINGS else PAIRINGS[pairing]


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
    return dirs, cfgs
