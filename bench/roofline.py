"""The decode step's physical floor: the bytes one step must read (every weight once, the lm_head but
not the embedding table, and the KV cache of every sequence) over the measured copy bandwidth. Counts
come from HF config dicts (bench/configs) read as the engine reads them (ModelConfig.from_dict: HF's
defaults for omitted keys, such as Qwen3's head_dim of 128), checked against transformers' own parameter
counts in tests/test_bench_smoke.py.

A mixture of experts reads, in each sparse layer, the router and the experts its tokens route to: for
``tokens`` tokens each routed to k of E experts uniformly at random, E·(1 − (1 − k/E)^tokens) of them in
expectation (k at one token, nearly all at prefill sizes). Trained routers are skewed, so fewer distinct
experts, and a lower floor: this is the floor at uniform routing, which random-weight benchmarks
approximate."""
from __future__ import annotations

from rast_engine.models.config import ModelConfig


def expected_experts(m: ModelConfig, tokens: int) -> float:
    """Distinct experts one sparse layer reads for ``tokens`` tokens at uniform routing."""
    return m.num_experts * (1 - (1 - m.experts_per_token / m.num_experts) ** tokens)


def param_counts(cfg: dict, tokens: int = 1) -> tuple[int, int]:
    """(all parameters, parameters a decode step of ``tokens`` tokens reads). The input embedding is a
    gather of B rows, so only the lm_head counts as read (the same matrix when tied); every other weight
    is read once, an expert's only where tokens route to it (expected_experts). A config with "lora_rank"
    is an RL model given as a LoRA adapter of that rank on every projection over the model it describes
    (bench/decode_configs.py): stacked with that base it reads only its adapter's A and B (or the slots'
    of bench/lora_modules.py: "lora_rank" times their number). A fused projection's B spans all its rows
    for each part's columns (block-diagonal in models/lora.py and a slot of models/lora_slots.py): a GEMM
    reads the zeros too. With "lora_gathered" (rast_kernels.lora_slots, the CUDA layer ops) a step reads
    only the diagonal blocks, and only of the slots its tokens use: "lora_read_rank" (default: all)."""
    m = ModelConfig.from_dict(cfg)
    if cfg.get("lora_rank"):
        h, q, kv, i = m.hidden_size, m.q_size, m.kv_size, m.intermediate_size
        a = 3 * h + q + 2 * h + i  # q/k/v, o, gate/up, down: a part's R rows of A each
        b, diagonal = 3 * (q + 2 * kv) + h + 2 * (2 * i) + h, (q + 2 * kv) + h + 2 * i + h
        held = m.num_layers * cfg["lora_rank"] * (a + b)
        if not cfg.get("lora_gathered"):
            return held, held
        return held, m.num_layers * cfg.get("lora_read_rank", cfg["lora_rank"]) * (a + diagonal)
    h, q, kv = m.hidden_size, m.q_size, m.kv_size
    bias = (q + 2 * kv if m.attention_bias else 0) + (h if m.o_proj_bias else 0)
    qk_norm = 2 * m.head_dim if m.qk_norm else (q + kv if m.qk_norm_full else 0)
    norms = (4 if m.sandwich_norm else 2) * h
    attention = h * q + 2 * h * kv + q * h + norms + bias + qk_norm
    sparse = sum(m.moe_layers) if m.num_experts else 0
    dense = (m.num_layers - sparse) * 3 * h * m.intermediate_size
    expert = 3 * h * m.moe_intermediate_size
    shared = 3 * h * m.shared_expert_intermediate_size + (h if m.shared_expert_intermediate_size else 0)
    per_sparse = h * m.num_experts + shared  # the router and the shared expert, read at any batch
    experts_read = round(sparse * expected_experts(m, tokens) * expert) if sparse else 0
    body = m.num_layers * attention + dense + sparse * per_sparse + h  # + final norm
    lm_head = m.vocab_size * h
    total = body + sparse * m.num_experts * expert + lm_head * (1 if m.tie_word_embeddings else 2)
    return total, body + experts_read + lm_head


def projection_counts(cfg: dict, tokens: int = 1, read: bool = False) -> tuple[int, int]:
    """(the decoder projections' parameters, their output channels): what quantization="fp8" stores as
    FP8 weights with one float32 scale per output channel (engine/models/fp8.py), a sparse layer's experts
    included (``read``: only the experts a step of ``tokens`` tokens reaches, expected_experts)."""
    m = ModelConfig.from_dict(cfg)
    h, q, kv, inter = m.hidden_size, m.q_size, m.kv_size, m.intermediate_size
    sparse = sum(m.moe_layers) if m.num_experts else 0
    params = m.num_layers * (2 * h * q + 2 * h * kv) + (m.num_layers - sparse) * 3 * h * inter
    channels = m.num_layers * (q + 2 * kv + h) + (m.num_layers - sparse) * (2 * inter + h)
    if sparse:
        experts = expected_experts(m, tokens) if read else m.num_experts
        shared = m.shared_expert_intermediate_size
        params += sparse * 3 * h * shared + round(sparse * experts * 3 * h * m.moe_intermediate_size)
        channels += sparse * (2 * shared + h if shared else 0) + round(sparse * experts * (2 * m.moe_intermediate_size + h))
    return params, channels


def weight_bytes(cfg: dict, elt: int, fp8: bool = False, read: bool = False, tokens: int = 1) -> int:
    """All of a model's weight bytes (``read``: those a decode step of ``tokens`` tokens reads), its
    projections in FP8 when ``fp8`` (one byte a weight, plus four per output channel for the scales)."""
    params = param_counts(cfg, tokens)[1 if read else 0]
    if not fp8:
        return params * elt
    proj, channels = projection_counts(cfg, tokens, read)
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
    weights = sum(weight_bytes(c, elt, fp8_large and i == 0, read=True, tokens=batch) for i, c in enumerate(cfgs))
    kv = batch * sum(kv_bytes_read(c, kv_elt or elt, mean_context) for c in cfgs)
    # issue 4 words its roofline as every weight's bytes, the input embedding tables too: kept beside
    # the floor above, the stricter one, so each target is judged by both
    every = sum(weight_bytes(c, elt, fp8_large and i == 0) for i, c in enumerate(cfgs))
    return dict(weight_bytes_read=weights, kv_bytes_read=int(kv), roofline_ms=(weights + kv) / bandwidth * 1e3,
                weight_bytes_all=every, roofline_all_weights_ms=(every + kv) / bandwidth * 1e3)
