"""ModelConfig reads a config.json as HF transformers' config classes read it: both key layouts
(transformers 4 and 5), the defaults of omitted keys and an explicit null, and Qwen2.5-1M's dual chunk
attention served as one chunk."""
from __future__ import annotations

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


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama", "olmo2"])
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
    assert ours.rope_theta == (hf.rope_parameters["rope_theta"] if hasattr(hf, "rope_parameters") else hf.rope_theta)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama", "olmo2"])
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
