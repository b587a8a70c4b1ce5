"""The defaults of HF transformers' config classes, per model_type."""
from __future__ import annotations

# HF's config classes' defaults for keys a config.json may omit, where they are not derived from others
# (Llama: KV heads = heads; Llama, Qwen2: head_dim = hidden // heads): Qwen3's head_dim is 128 whatever
# the hidden size; tests/test_model_config.py checks every default against transformers' classes
HF_DEFAULTS: dict[str, dict[str, float]] = {
    "qwen2": {"num_key_value_heads": 32, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
    "qwen3": {"num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
    "mistral": {"num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6},
    "olmo2": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-5},
    "olmo3": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-5},
    "qwen3_moe": {"num_key_value_heads": 4, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
    "qwen2_moe": {"num_key_value_heads": 16, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
    "mixtral": {"num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 1e6},
    "olmoe": {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "gemma2": {"num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
               "vocab_size": 256000, "query_pre_attn_scalar": 256, "final_logit_softcapping": 30.0,
               "attn_logit_softcapping": 50.0},
    "gemma3_text": {"hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
                    "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
                    "vocab_size": 262208, "query_pre_attn_scalar": 256},
}
