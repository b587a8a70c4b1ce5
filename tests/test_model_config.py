"""ModelConfig reads a config.json as HF transformers' config classes read it: both key layouts
(transformers 4 and 5), the defaults of omitted keys and an explicit null, and Qwen2.5-1M's dual chunk
attention served as one chunk."""
from __future__ import annotations

import copy
import dataclasses
import pytest
import torch
from transformers import AutoConfig

from factories import LLAMA3_SCALING
from rast_engine.errors import ModelLoadError
from rast_engine.models import ModelConfig


def test_legacy_config_layout() -> None:
    """Published checkpoints use the transformers-4 keys; both layouts must read the same."""
    cfg = ModelConfig.from_dict({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "rope_theta": 5e5,
        "rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA3_SCALING.items() if k != "rope_type"}},
        "torch_dtype": "bfloat16", "max_position_embeddings": 256,
    })
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == LLAMA3_SCALING
    assert cfg.torch_dtype == torch.bfloat16 and cfg.head_dim == 16 and not cfg.attention_bias
    assert cfg.kv_bytes_per_token(torch.bfloat16) == 2 * 2 * 2 * 16 * 2
    assert cfg.kv_cache_shape(10, 16) == (10, 16, 2, 16)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama", "mistral", "olmo2", "olmo3", "gemma2",
                                        "gemma3_text", "qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_omitted_keys_take_transformers_defaults(model_type: str) -> None:
    """A config.json with only the required keys reads as transformers' config class reads it (Qwen3's
    head_dim is 128, not hidden // heads; Llama's context is 2048)."""
    given = {"model_type": model_type, "hidden_size": 256, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 32, "vocab_size": 64}
    ours, hf = ModelConfig.from_dict(given), AutoConfig.for_model(**given)
    assert ours.num_kv_heads == hf.num_key_value_heads
    assert ours.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert ours.max_position_embeddings == hf.max_position_embeddings
    assert (ours.rms_norm_eps, ours.tie_word_embeddings) == (hf.rms_norm_eps, hf.tie_word_embeddings)
    rope = hf.rope_parameters if hasattr(hf, "rope_parameters") else {"rope_theta": hf.rope_theta}
    if "full_attention" in rope:  # per layer type (OLMo 3)
        assert ours.sliding_rope == (rope["sliding_attention"]["rope_theta"], None)
        rope = rope["full_attention"]
    assert ours.rope_theta == rope["rope_theta"]
    assert ours.layer_windows == hf_windows(hf)
    assert (ours.attn_softcap, ours.logit_softcap) == (getattr(hf, "attn_logit_softcapping", None),
                                                       getattr(hf, "final_logit_softcapping", None))
    experts = getattr(hf, "num_experts", None) or getattr(hf, "num_local_experts", None) or 0
    assert (ours.num_experts, ours.experts_per_token) == (experts, getattr(hf, "num_experts_per_tok", 0))
    if experts:
        assert ours.moe_intermediate_size == (getattr(hf, "moe_intermediate_size", None) or hf.intermediate_size)
        assert ours.norm_topk_prob == getattr(hf, "norm_topk_prob", True)  # Mixtral always renormalises
        assert ours.shared_expert_intermediate_size == (getattr(hf, "shared_expert_intermediate_size", None) or 0)
        assert ours.attention_bias == bool(getattr(hf, "qkv_bias", None) or getattr(hf, "attention_bias", False))


def hf_windows(hf: object) -> tuple:
    """Per layer, the window transformers' attention uses (None: full), or () where none slides."""
    window = getattr(hf, "sliding_window", None)
    # MistralModel has no layer_types: its one mask slides in every layer when a window is set
    types = getattr(hf, "layer_types", None) or ["sliding_attention"] * hf.num_hidden_layers
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    return windows if window is not None and any(windows) else ()


@pytest.mark.parametrize("given", [
    {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
    {"use_sliding_window": True, "max_window_layers": 1},  # the class's window, 4096
    {"use_sliding_window": False, "sliding_window": 8},  # a window stated but off
    {"use_sliding_window": True, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"] * 2},
], ids=["derived", "default-window", "off", "stated-types"])
def test_qwen2_sliding_windows_read_as_transformers_reads_them(given: dict) -> None:
    cfg = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, **given}
    ours, hf = ModelConfig.from_dict(cfg), AutoConfig.for_model(**cfg)
    assert ours.layer_windows == hf_windows(hf)
    assert ours.layer_windows or given["use_sliding_window"] is False


def test_olmo3_published_layout_reads_as_transformers_reads_it() -> None:
    """OLMo 3's published config.json (transformers 4 keys): one rope_theta and a YaRN rope_scaling, which
    transformers applies to the full-attention layers only, and a window in three layers of four."""
    cfg = {"model_type": "olmo3", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 8,
           "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 64, "rope_theta": 5e5,
           "sliding_window": 4096, "max_position_embeddings": 65536,
           "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
                            "attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1}}
    ours, hf = ModelConfig.from_dict(cfg), AutoConfig.for_model(**cfg)
    assert ours.layer_windows == hf_windows(hf) == (4096, 4096, 4096, None) * 2
    full, sliding = hf.rope_parameters["full_attention"], hf.rope_parameters["sliding_attention"]
    assert ours.rope_theta == full["rope_theta"] and ours.rope_scaling == {k: v for k, v in full.items()
                                                                            if k != "rope_theta"}
    assert ours.sliding_rope == (sliding["rope_theta"], None) and sliding["rope_type"] == "default"
    # the layout transformers 5 writes back reads the same
    assert ModelConfig.from_dict(hf.to_dict()) == ours


@pytest.mark.parametrize("bad, match", [({"layer_types": ["full_attention"]}, "layer_types"),
                                        ({"layer_types": ["local"] * 2}, "layer_types"),
                                        ({"sliding_window": 0}, "sliding_window"),
                                        ({"rope_parameters": {"full_attention": {"rope_theta": 1e4}}}, "lacks")])
def test_bad_layer_kinds_are_refused(bad: dict, match: str) -> None:
    cfg = {"model_type": "olmo3", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 64, **bad}
    with pytest.raises(ModelLoadError, match=match):
        ModelConfig.from_dict(cfg)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama", "olmo2", "olmo3"])  # Mistral and Gemma refuse it
def test_null_kv_heads_read_as_transformers_reads_them(model_type: str) -> None:
    """An explicit "num_key_value_heads": null is multi-head attention in transformers' classes (the
    omitted key's default, 32 for Qwen, would refuse a 4-head model or misread a 64-head one)."""
    given = {"model_type": model_type, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": None, "vocab_size": 64}
    ours, hf = ModelConfig.from_dict(given), AutoConfig.for_model(**given)
    assert ours.num_kv_heads == hf.num_key_value_heads == 4


def test_dual_chunk_attention_checkpoint_serves_one_chunk(caplog: pytest.LogCaptureFixture) -> None:
    """Qwen2.5-14B-Instruct-1M's config: 1,010,000 positions through dual chunk attention, which the engine
    does not run; full attention equals it within one chunk, so the context is that chunk, with a warning."""
    given = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "rope_theta": 1e7,
             "max_position_embeddings": 1010000, "sliding_window": 131072, "use_sliding_window": False,
             "dual_chunk_attention_config": {"chunk_size": 262144, "local_size": 8192,
                                             "original_max_position_embeddings": 262144}}
    with caplog.at_level("WARNING", logger="rast"):
        cfg = ModelConfig.from_dict(given)
    assert cfg.max_context == cfg.max_position_embeddings == 262144
    assert "dual_chunk_attention_config" in caplog.text and "262144" in caplog.text
    small = ModelConfig.from_dict({**given, "max_position_embeddings": 32768})  # within a chunk: unchanged
    assert small.max_context == 32768
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}
    with pytest.raises(ModelLoadError, match="dual_chunk_attention_config with a yarn rope scaling"):
        ModelConfig.from_dict({**given, "rope_scaling": yarn})  # it would stretch the context past the chunk


def test_olmo3_rope_scaling_beside_per_kind_parameters_stretches_the_full_layers() -> None:
    """transformers 5 writes OLMo 3's rope_parameters per layer type; a model card's YaRN block added beside
    them as rope_scaling stretches the full-attention layers, and kinds without a theta take OLMo 3's."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = {"model_type": "olmo3", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 4,
           "num_attention_heads": 4, "vocab_size": 64, "rope_scaling": yarn,
           "rope_parameters": {"full_attention": {"rope_type": "default"},
                               "sliding_attention": {"rope_type": "default"}}}
    ours, hf = ModelConfig.from_dict(copy.deepcopy(cfg)), AutoConfig.for_model(**copy.deepcopy(cfg))
    full = hf.rope_parameters["full_attention"]
    assert full["rope_type"] == "yarn" and ours.rope_scaling == {k: v for k, v in full.items() if k != "rope_theta"}
    assert ours.rope_theta == full["rope_theta"] == 500000 and ours.sliding_rope == (500000, None)


def test_gemma3_published_layout_reads_as_transformers_reads_it() -> None:
    """Gemma 3's multimodal checkpoints (gemma-3-4b-pt and larger) hold the language model's config as
    text_config in transformers 4 keys: a local rope base, a linear scaling of the global layers, GELU."""
    text = {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 12, "num_attention_heads": 8,
            "num_key_value_heads": 4, "head_dim": 256, "sliding_window": 1024, "rope_theta": 1e6,
            "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "query_pre_attn_scalar": 256, "model_type": "gemma3_text"}
    ours = ModelConfig.from_dict({"model_type": "gemma3", "text_config": copy.deepcopy(text),
                                  "torch_dtype": "bfloat16"})
    hf = AutoConfig.for_model(**copy.deepcopy(text))
    assert ours.layer_windows == hf_windows(hf) == (1024,) * 5 + (None,) + (1024,) * 5 + (None,)
    full, local = hf.rope_parameters["full_attention"], hf.rope_parameters["sliding_attention"]
    assert (ours.rope_theta, ours.rope_scaling) == (full["rope_theta"], {"rope_type": "linear", "factor": 8.0})
    assert ours.sliding_rope == (local["rope_theta"], None) and ours.torch_dtype == torch.bfloat16
    assert (ours.activation, ours.attn_scale, ours.embed_scale) == ("gelu_tanh", 1 / 16, 2560 ** 0.5)
    assert ours.tie_word_embeddings and ours.vocab_size == hf.vocab_size and ours.norm_offset == 1.0
    assert ModelConfig.from_dict(hf.to_dict()) == dataclasses.replace(ours, torch_dtype=ModelConfig.from_dict(
        hf.to_dict()).torch_dtype)
    for key, value in (("final_logit_softcapping", 30.0), ("use_bidirectional_attention", True)):
        with pytest.raises(ModelLoadError, match=key):
            ModelConfig.from_dict({**text, key: value})


def test_gemma3_4b_text_config_leaves_its_class_defaults_out() -> None:
    """gemma-3-4b-pt's text_config states only what differs from Gemma3TextConfig (no heads, KV heads or
    head_dim); its 128K context is stretched already, so the linear factor of 8 does not stretch it again
    (as vLLM takes it); a pre-quantized checkpoint's top-level quantization_config is refused by name."""
    text = {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, "sliding_window": 1024,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "model_type": "gemma3_text"}
    ours = ModelConfig.from_dict({"model_type": "gemma3", "text_config": copy.deepcopy(text)})
    hf = AutoConfig.for_model(**copy.deepcopy(text))
    assert (ours.num_heads, ours.num_kv_heads, ours.head_dim) == (hf.num_attention_heads, hf.num_key_value_heads,
                                                                  hf.head_dim) == (8, 4, 256)
    assert ours.max_context == ours.max_position_embeddings == hf.max_position_embeddings == 131072
    with pytest.raises(ModelLoadError, match="pre-quantized"):
        ModelConfig.from_dict({"model_type": "gemma3", "text_config": text,
                               "quantization_config": {"quant_method": "fp8"}})


def test_gemma2_caps_are_read_or_refused() -> None:
    """Gemma 2 caps its attention scores and logits (explicit null: no cap, as transformers reads it); no
    other family may ask for a cap the engine would not apply."""
    cfg = {"model_type": "gemma2", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 64}
    assert ModelConfig.from_dict({**cfg, "attn_logit_softcapping": None}).attn_softcap is None
    assert ModelConfig.from_dict({**cfg, "final_logit_softcapping": 20.0}).logit_softcap == 20.0
    with pytest.raises(ModelLoadError, match="positive"):
        ModelConfig.from_dict({**cfg, "final_logit_softcapping": 0.0})
    with pytest.raises(ModelLoadError, match="attn_logit_softcapping"):
        ModelConfig.from_dict({**cfg, "model_type": "llama", "attn_logit_softcapping": 50.0})


def test_qkv_bias_is_qwen2_moes_key_only() -> None:
    """Dense Qwen2 always has q/k/v biases (transformers ignores a qkv_bias key there); Qwen2-MoE's config
    may turn them off."""
    given = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 64, "qkv_bias": False}
    assert ModelConfig.from_dict({**given, "model_type": "qwen2"}).attention_bias
    assert not ModelConfig.from_dict({**given, "model_type": "qwen2_moe"}).attention_bias
    assert ModelConfig.from_dict({**given, "model_type": "qwen2_moe", "qkv_bias": True}).attention_bias
