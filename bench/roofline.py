"""The decode step's physical floor: the bytes one step must read (every weight once, the lm_head but
not the embedding table, and the KV cache of every sequence) over the measured copy bandwidth. Counts
come from HF config dicts (bench/configs), checked against transformers' own parameter counts in
tests/test_bench_smoke.py."""
from __future__ import annotations


def param_counts(cfg: dict) -> tuple[int, int]:
    """(all parameters, parameters one decode step reads). The input embedding is a gather of B rows, so
    only the lm_head counts as read (the same matrix when tied); every other weight is read once."""
    h, inter, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    q, kv = heads * hd, kv_heads * hd
    qwen = cfg["model_type"] == "qwen2"
    bias = (q + 2 * kv) if qwen or cfg.get("attention_bias") else 0
    bias += h if not qwen and cfg.get("attention_bias") else 0
    qk_norm = 2 * hd if cfg["model_type"] == "qwen3" else 0
    layer = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h + bias + qk_norm
    body = layers * layer + h  # + final norm
    tied = cfg.get("tie_word_embeddings", False)
    return body + vocab * h * (1 if tied else 2), body + vocab * h


def kv_bytes_per_token(cfg: dict, elt: int) -> int:
    heads = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * (cfg.get("num_key_value_heads") or heads) * hd * elt


def roofline_ms(cfgs: list[dict], elt: int, batch: int, mean_context: float, bandwidth: float) -> dict:
    weights = sum(param_counts(c)[1] for c in cfgs) * elt
    kv = batch * mean_context * sum(kv_bytes_per_token(c, elt) for c in cfgs)
    return dict(weight_bytes_read=weights, kv_bytes_read=int(kv), roofline_ms=(weights + kv) / bandwidth * 1e3)
