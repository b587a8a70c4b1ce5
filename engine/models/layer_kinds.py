"""Which layers attend through a sliding window, and the rotary embedding of such layers, read from an HF
config.json as transformers' config classes read it.

- ``layer_types`` (``"full_attention"`` / ``"sliding_attention"`` per layer) when the config states them;
  otherwise each class's rule: OLMo 3 slides in three layers of four (every fourth is full), Qwen2 and
  Qwen3 slide from ``max_window_layers`` on when ``use_sliding_window`` is set, Mistral and Mixtral in every
  layer when their ``sliding_window`` is not null, Gemma 2 every other layer and Gemma 3 five of six, Llama and
  OLMo 2 never.
- The window: ``sliding_window`` (Qwen's only under ``use_sliding_window``), in HF's sense: a token sees
  itself and the window - 1 tokens before it.
- OLMo 3 gives the two kinds their own rotary parameters: transformers 5 writes ``rope_parameters`` per
  layer type; a transformers-4 config (the published checkpoints) has one ``rope_theta`` and a
  ``rope_scaling`` that, as transformers reads it, stretches the full-attention layers only. A flat
  ``rope_parameters`` (written by a transformers 5 pre-release) is read as that ``rope_scaling``; the
  transformers release of 2026-12 reads a flat YaRN block in an OLMo 3 config as no scaling at all, which
  would drop the long-context recipe the checkpoint was trained with. A ``rope_scaling`` beside per-kind
  ``rope_parameters`` stretches the full layers, as transformers merges it.
"""
from __future__ import annotations

from typing import Any, Optional

from rast_engine.errors import ModelLoadError

KINDS = ("full_attention", "sliding_attention")
# the class defaults of the keys a config may omit
DEFAULT_WINDOW = {"qwen2": 4096, "qwen3": 4096, "olmo3": 4096, "mistral": 4096, "gemma3_text": 4096, "gemma2": 4096,
                  "mixtral": None}
GEMMA3_PATTERN = 6  # Gemma 3: every sixth layer attends fully
GEMMA3_ROPE = (1e6, 10000.0)  # the full layers' rope_theta and the sliding layers' (rope_local_base_freq)
DEFAULT_MAX_WINDOW_LAYERS = 28  # Qwen2's and Qwen3's
OLMO3_ROPE_THETA = 500000.0


def layer_windows(cfg: dict[str, Any], model_type: str, num_layers: int) -> tuple[Optional[int], ...]:
    """Per layer, its sliding window, or None for full attention; () when no layer slides."""
    if model_type in ("qwen2", "qwen3"):
        window = cfg.get("sliding_window", DEFAULT_WINDOW[model_type]) if cfg.get("use_sliding_window") else None
    else:
        window = cfg.get("sliding_window", DEFAULT_WINDOW.get(model_type)) if model_type in DEFAULT_WINDOW else None
    types = cfg.get("layer_types")
    if types is None:
        types = _default_types(cfg, model_type, num_layers, window)
    if not isinstance(types, list) or len(types) != num_layers or any(t not in KINDS for t in types):
        raise ModelLoadError(f"config layer_types must list {num_layers} of {KINDS}, got {types!r}")
    if window is None or "sliding_attention" not in types:
        return ()
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ModelLoadError(f"config sliding_window must be a positive integer, got {window!r}")
    return tuple(window if t == "sliding_attention" else None for t in types)


def _default_types(cfg: dict[str, Any], model_type: str, num_layers: int, window: Optional[int]) -> list[str]:
    if model_type == "olmo3":
        return ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(num_layers)]
    if model_type in ("qwen2", "qwen3") and window is not None:
        first = cfg.get("max_window_layers", DEFAULT_MAX_WINDOW_LAYERS)
        return ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if model_type in ("mistral", "mixtral"):
        return ["sliding_attention"] * num_layers
    if model_type == "gemma2":  # every other layer, the first sliding
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    if model_type == "gemma3_text":
        pattern = cfg.get("sliding_window_pattern") or GEMMA3_PATTERN
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    return ["full_attention"] * num_layers


def language_model_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config of the language model to serve: a multimodal Gemma 3 checkpoint's (model_type gemma3)
    text_config, with the checkpoint's dtype where it gives none (the loader finds its weights under
    their prefix)."""
    if cfg.get("model_type") != "gemma3":
        return cfg
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise ModelLoadError("a gemma3 config needs a text_config object")
    inherited = {k: cfg[k] for k in ("dtype", "torch_dtype", "tie_word_embeddings", "quantization_config")
                 if k in cfg and k not in text}  # a pre-quantized checkpoint's, so it is refused by name
    return {**inherited, **text, "model_type": "gemma3_text"}


def per_kind_rope(cfg: dict[str, Any]) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
    """(the full layers' rope config, the sliding layers') as two flat configs that rope_config.rope_of reads,
    where the kinds differ (OLMo 3); None where every layer shares the config's one rope."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and set(params) & set(KINDS):
        missing = [k for k in KINDS if not isinstance(params.get(k), dict)]
        if missing:
            raise ModelLoadError(f"config rope_parameters per layer type lacks {missing}")
        # as transformers merges them: a kind without its own theta takes the config's (OLMo 3's default
        # without), and a rope_scaling beside them (a model card's YaRN block) stretches the full layers
        theta = cfg.get("rope_theta", OLMO3_ROPE_THETA if cfg.get("model_type") == "olmo3" else None)
        full, sliding = ({"rope_theta": theta, **params[k]} if theta is not None else dict(params[k]) for k in KINDS)
        return {"rope_parameters": full, "rope_scaling": cfg.get("rope_scaling")}, {"rope_parameters": sliding}
    if cfg.get("model_type") == "gemma3_text":  # transformers 4's keys: the local layers' own base
        flat = dict(params or {})
        full = {"rope_theta": flat.get("rope_theta", cfg.get("rope_theta", GEMMA3_ROPE[0])),
                "rope_parameters": flat or None, "rope_scaling": cfg.get("rope_scaling")}
        return full, {"rope_parameters": {"rope_type": "default",
                                          "rope_theta": cfg.get("rope_local_base_freq", GEMMA3_ROPE[1])}}
    if cfg.get("model_type") == "olmo3":
        flat = dict(params or {})
        theta = flat.get("rope_theta", cfg.get("rope_theta", OLMO3_ROPE_THETA))
        full = {"rope_theta": theta, "rope_parameters": flat or None, "rope_scaling": cfg.get("rope_scaling")}
        return full, {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    return None
