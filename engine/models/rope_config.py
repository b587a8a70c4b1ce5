"""The rotary embedding a config.json asks for: rope_theta and a rope scaling, from either config layout,
checked against what models/rope.py implements; and the context a dual chunk attention checkpoint is
served at (ModelConfig.from_dict reads them through these)."""
from __future__ import annotations

import logging
import math
from typing import Any

from rast_engine.errors import ModelLoadError

logger = logging.getLogger("rast")

LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# the rope scalings models/rope.py implements, and the keys each needs (yarn without a factor takes
# max_position_embeddings / original_max_position_embeddings, as HF does)
ROPE_KEYS = {"llama3": LLAMA3_KEYS, "yarn": ("original_max_position_embeddings",), "linear": ("factor",)}


def check_scaling(scaling: dict[str, Any] | None) -> None:
    """A rope scaling models/rope.py implements, with every value it needs (None: plain rotary)."""
    if scaling is None:
        return
    kind = scaling.get("rope_type")
    if kind not in ROPE_KEYS:
        raise ModelLoadError(f"unsupported rope_scaling {scaling!r}; rope_type "
                             f"{', '.join(map(repr, ROPE_KEYS))} are implemented")
    missing = [k for k in ROPE_KEYS[kind] if k not in scaling]
    if missing:
        raise ModelLoadError(f"{kind} rope_scaling lacks {missing}")
    for key in ROPE_KEYS[kind]:  # every required value divides or scales: positive and finite
        value = scaling[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ModelLoadError(f"{kind} rope_scaling needs a positive {key}, got {value!r}")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ModelLoadError("llama3 rope_scaling needs high_freq_factor > low_freq_factor")
    factor = scaling.get("factor")
    if (factor is not None or kind != "yarn") and not (isinstance(factor, (int, float)) and factor > 0):
        raise ModelLoadError(f"{kind} rope_scaling needs a positive factor, got {factor!r}")

def rope_of(cfg: dict[str, Any], default_theta: float = 10000.0) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope scaling or None) from either config layout; 'type' is the old key for rope_type.
    A rope_scaling replaces rope_parameters, as in HF (transformers 5 saves rope_parameters with type
    "default", and a model card's YaRN block is added as rope_scaling). rope_theta: rope_parameters' then
    the top level's, as HF reads them; with a rope_scaling, its own, the top level's, then the replaced
    rope_parameters' (where HF falls back to its class default instead: the checkpoint's theta is the
    one it was trained with); none given, the class's ``default_theta``."""
    for key in ("rope_parameters", "rope_scaling"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise ModelLoadError(f"config {key} must be an object, got {cfg[key]!r}")
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling")
    order = (legacy, cfg, params) if legacy else (params, cfg)
    theta = next((d["rope_theta"] for d in order if d.get("rope_theta") is not None), default_theta)
    if legacy:
        params = dict(legacy)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = rope_type
    return float(theta), scaling


def full_attention_positions(cfg: dict[str, Any], positions: int, scaling: dict[str, Any] | None) -> int:
    """max_position_embeddings, capped where the checkpoint relies on dual chunk attention (Qwen2.5-1M),
    which the engine does not implement: within one chunk it equals full attention, past it vLLM's and
    SGLang's outputs differ from full attention's, so the engine serves one chunk's positions (a rope
    scaling beside it, which would stretch the context past the chunk again, is refused)."""
    dca = cfg.get("dual_chunk_attention_config")
    if not isinstance(dca, dict):
        return positions
    if scaling is not None:
        raise ModelLoadError(f"dual_chunk_attention_config with a {scaling['rope_type']} rope scaling is not "
                             "supported: the engine runs full attention, within one chunk only")
    bounds = [int(dca[k]) for k in ("chunk_size", "original_max_position_embeddings") if dca.get(k)]
    if not bounds or min(bounds) >= positions:
        return positions
    logger.warning("dual_chunk_attention_config: the engine runs full attention, which equals dual chunk "
                   "attention within one chunk; context capped at %d positions (max_position_embeddings %d)",
                   min(bounds), positions)
    return min(bounds)
