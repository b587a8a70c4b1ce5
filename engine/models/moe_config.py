"""The mixture-of-experts facts of an HF config.json, read as transformers' config classes read them.

- Qwen3-MoE and Qwen2-MoE: ``num_experts`` (transformers 5 writes ``num_local_experts``),
  ``num_experts_per_tok``, ``moe_intermediate_size``, ``norm_topk_prob``; a layer is sparse unless it is in
  ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step``, else a dense MLP of ``intermediate_size``.
  Qwen2-MoE adds a shared expert of ``shared_expert_intermediate_size`` behind a sigmoid gate.
- Mixtral: ``num_local_experts`` experts of ``intermediate_size``, the top-k weights always renormalised
  and passed to the experts in float32.
- OLMoE: ``num_experts`` experts of ``intermediate_size``, ``norm_topk_prob``.
"""
from __future__ import annotations

from typing import Any

from rast_engine.errors import ModelLoadError

MOE_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")
# the config classes' defaults for the keys a config.json may omit (tests/test_model_config.py checks them)
MOE_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3_moe": {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                  "norm_topk_prob": False},
    "qwen2_moe": {"num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                  "norm_topk_prob": False, "shared_expert_intermediate_size": 5632},
    "mixtral": {"num_experts": 8, "num_experts_per_tok": 2},
    "olmoe": {"num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False},
}


def moe_fields(cfg: dict[str, Any], model_type: str, num_layers: int, intermediate_size: int) -> dict[str, Any]:
    """ModelConfig's MoE keyword arguments ({} for a dense model)."""
    if model_type not in MOE_TYPES:
        return {}
    defaults = MOE_DEFAULTS[model_type]

    def get(key: str, *aliases: str) -> Any:
        for name in (key, *aliases):
            if cfg.get(name) is not None:
                return cfg[name]
        return defaults[key]

    if model_type in ("qwen3_moe", "qwen2_moe") and cfg.get("use_sliding_window"):
        raise ModelLoadError(f"use_sliding_window=true is not supported for model_type {model_type!r}")
    if model_type == "olmoe" and cfg.get("clip_qkv") is not None:
        raise ModelLoadError("OLMoE's clip_qkv is not supported")
    qwen = model_type in ("qwen3_moe", "qwen2_moe")
    step, dense = (cfg.get("decoder_sparse_step", 1), cfg.get("mlp_only_layers") or []) if qwen else (1, [])
    if isinstance(step, bool) or not isinstance(step, int) or step < 1 or not isinstance(dense, list):
        raise ModelLoadError(f"decoder_sparse_step must be >= 1 and mlp_only_layers a list, got {step!r}, {dense!r}")
    return {
        "num_experts": int(get("num_experts", "num_local_experts")),
        "experts_per_token": int(get("num_experts_per_tok")),
        "moe_intermediate_size": int(get("moe_intermediate_size")) if qwen else intermediate_size,
        "norm_topk_prob": True if model_type == "mixtral" else bool(get("norm_topk_prob")),
        "router_fp32": model_type == "mixtral",
        "moe_layers": tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers)),
        "shared_expert_intermediate_size": int(get("shared_expert_intermediate_size"))
        if model_type == "qwen2_moe" else 0,
    }
