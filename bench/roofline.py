"""The decode step's physical floor: the bytes one step must read (every weight once, the lm_head but
not the embedding table, and the KV cache of every sequence) over the measured copy bandwidth. Counts
come from HF config dicts (bench/configs) read as the engine reads them (ModelConfig.from_dict: HF's
defaults for omitted keys, such as Qwen3's head_dim of 128), checked against transformers' own parameter
counts in tests/test_bench_smoke.py."""
from __future__ import annotations

from rast_engine.models.config import ModelConfig


def param_counts(cfg: dict) -> tuple[int, int]:
    """(all parameters, parameters one decode step reads). The input embedding is a gather of B rows, so
    only the lm_head counts as read (the same matrix when tied); every other weight is read once."""
    m = ModelConfig.from_dict(cfg)
    h, q, kv = m.hidden_size, m.q_size, m.kv_size
    bias = (q + 2 * kv if m.attention_bias else 0) + (h if m.o_proj_bias else 0)
    qk_norm = 2 * m.head_dim if m.qk_norm else (q + kv if m.qk_norm_full else 0)
    norms = (4 if m.sandwich_norm else 2) * h
    layer = h * q + 2 * h * kv + q * h + 3 * h * m.intermediate_size + norms + bias + qk_norm
    body = m.num_layers * layer + h  # + final norm
    lm_head = m.vocab_size * h
    return body + lm_head * (1 if m.tie_word_embeddings else 2), body + lm_head


def projection_counts(cfg: dict) -> tuple[int, int]:
    """(the decoder projections' parameters, their output channels): what quantization="fp8" stores as
    FP8 weights with one float32 scale per output channel (engine/models/fp8.py)."""
    m = ModelConfig.from_dict(cfg)
    h, q, kv, inter = m.hidden_size, m.q_size, m.kv_size, m.intermediate_size
    return m.num_layers * (2 * h * q + 2 * h * kv + 3 * h * inter), m.num_layers * (q + 2 * kv + h + 2 * inter + h)


def weight_bytes(cfg: dict, elt: int, fp8: bool = False, read: bool = False) -> int:
    """All of a model's weight bytes (``read``: those one decode step reads), its projections in FP8 when
    ``fp8`` (one byte a weight, plus four per output channel for the scales)."""
    params = param_counts(cfg)[1 if read else 0]
    if not fp8:
        return params * elt
    proj, channels = projection_counts(cfg)
    return (params - proj) * elt + proj + 4 * channels


def kv_bytes_per_token(cfg: dict, elt: int) -> int:
    """What attention reads of one cached token; elt 1 is an FP8 cache, with a scale byte a KV head."""
    m = ModelConfig.from_dict(cfg)
    return 2 * m.num_layers * m.num_kv_heads * (m.head_dim * elt + (elt == 1))


def kv_bytes_read(cfg: dict, elt: int, context: float) -> float:
    """What one decode step's attention reads of a sequence's cache at ``context`` tokens: every layer's
    keys and values, a sliding-window layer's last ``window`` only (the cache still holds them all)."""
    m = ModelConfig.from_dict(cfg)
    per_layer = kv_bytes_per_token(cfg, elt) / m.num_layers
    windows = m.layer_windows or (None,) * m.num_layers
    return per_layer * sum(context if w is None else min(context, w) for w in windows)


def roofline_ms(cfgs: list[dict], elt: int, batch: int, mean_context: float, bandwidth: float,
                fp8_large: bool = False, kv_elt: int | None = None) -> dict:
    """``fp8_large``: cfgs[0], the large model, holds its projections in FP8 (quantization="fp8");
    ``kv_elt``: the KV cache's element size when not ``elt`` (1: kv_cache_dtype="fp8")."""
    weights = sum(weight_bytes(c, elt, fp8_large and i == 0, read=True) for i, c in enumerate(cfgs))
    kv = batch * sum(kv_bytes_read(c, kv_elt or elt, mean_context) for c in cfgs)
    # issue 4 words its roofline as every weight's bytes, the input embedding tables too: kept beside
    # the floor above, the stricter one, so each target is judged by both
    every = sum(weight_bytes(c, elt, fp8_large and i == 0) for i, c in enumerate(cfgs))
    return dict(weight_bytes_read=weights, kv_bytes_read=int(kv), roofline_ms=(weights + kv) / bandwidth * 1e3,
                weight_bytes_all=every, roofline_all_weights_ms=(every + kv) / bandwidth * 1e3)
