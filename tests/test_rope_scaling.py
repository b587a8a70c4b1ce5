"""Rope scalings beyond plain rotary and llama3 (engine/models/rope.py): yarn, Qwen2.5's long-context
recipe, and linear interpolation, against HF transformers' forward (the oracle), with the context a
yarn or linear factor stretches (ModelConfig.max_context)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from factories import make_model_dir, make_tokenizer
from rast_engine.attention.torch_backend import TorchAttention
from rast_engine.errors import ModelLoadError
from rast_engine.models import ModelConfig, load_model
from rast_engine.models.layer_ops import get_layer_ops
from test_models import ATOL, hf_logits, run_paged


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


# Qwen2.5's long-context recipe (the legacy "type" key), scaled down so the ramp falls inside head_dim 8
# at test lengths; and linear position interpolation
ROPE_SCALINGS = {"yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
                 "yarn_mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
                                 "mscale": 0.7, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2},
                 "linear": {"rope_type": "linear", "factor": 3.0}}


@pytest.mark.parametrize("name", sorted(ROPE_SCALINGS))
def test_rope_scalings_match_hf(tmp_path: Path, tok_dir: Path, name: str) -> None:
    """YaRN (its attention factor on cos and sin included) and linear scaling, on a Qwen2 model, both
    LayerOps backends, over a prefill with a cached prefix and decode steps: HF's forward, and not the
    unscaled model's."""
    scaled = make_model_dir(tmp_path / "s", "qwen2", rope_theta=1e4, rope_scaling=ROPE_SCALINGS[name],
                            tokenizer_dir=tok_dir)
    plain = make_model_dir(tmp_path / "p", "qwen2", rope_theta=1e4, tokenizer_dir=tok_dir)
    seqs = [list(range(3, 16)), list(range(40, 52))]
    for ops in ("torch", "triton"):
        model = load_model(scaled, device="cpu", dtype="float32", attention=TorchAttention(),
                           ops=get_layer_ops(ops, "cpu"))
        for seq, logits in zip(seqs, run_paged(model, seqs, [[5, 4], [4, 4]])):
            want = hf_logits(scaled, seq)
            torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
            assert (want - hf_logits(plain, seq)).abs().max() > 1e-2


def test_yarn_stretches_the_context_past_max_position_embeddings(tmp_path: Path, tok_dir: Path) -> None:
    """As Qwen2.5's recipe: max_position_embeddings stays, yarn's factor stretches what the model serves
    (original x factor, as vLLM derives it); positions past max_position_embeddings equal HF's forward."""
    from rast_engine import LLM
    from rast_engine.errors import RastError

    path = make_model_dir(tmp_path / "m", "qwen2", rope_theta=1e4, max_position_embeddings=16, tokenizer_dir=tok_dir,
                          rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    assert ModelConfig.from_dir(path).max_context == 64
    model = load_model(path, device="cpu", dtype="float32", attention=TorchAttention())
    seqs = [list(range(3, 43)), list(range(50, 90))]  # 40 positions, 24 past max_position_embeddings
    for seq, logits in zip(seqs, run_paged(model, seqs, [[20, 10], [20, 10]])):
        torch.testing.assert_close(logits, hf_logits(path, seq), atol=ATOL, rtol=0)
    assert LLM(str(path), device="cpu", kv_cache_blocks=32).llm_engine.config.max_model_len is None
    assert LLM(str(path), device="cpu", kv_cache_blocks=32).llm_engine.scheduler.stops.max_model_len == 64
    with pytest.raises(RastError, match="exceeds the models' context"):
        LLM(str(path), device="cpu", max_model_len=65)


def test_unsupported_rope_scalings_are_named(tmp_path: Path) -> None:
    for scaling, match in (({"rope_type": "dynamic", "factor": 2.0}, "'dynamic'"),
                           ({"rope_type": "yarn", "factor": 2.0}, "lacks"),
                           ({"rope_type": "linear", "factor": 0}, "positive factor"),
                           ({"rope_type": "yarn", "original_max_position_embeddings": 0}, "positive original"),
                           ({"rope_type": "yarn", "original_max_position_embeddings": None}, "positive original"),
                           ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}, "positive low_freq_factor")):
        with pytest.raises(ModelLoadError, match=match):
            ModelConfig.from_dict({"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "vocab_size": 64, "rope_scaling": scaling})


def test_a_rope_scaling_added_beside_rope_parameters_applies(tmp_path: Path, tok_dir: Path) -> None:
    """transformers 5 saves rope_parameters {"rope_type": "default"}; a model card's YaRN block added as
    rope_scaling replaces it, as in HF (it was merged under rope_parameters, which won: plain rotary)."""
    import json

    scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}
    path = make_model_dir(tmp_path / "m", "qwen2", rope_theta=1e4, max_position_embeddings=16, tokenizer_dir=tok_dir)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_theta", None)
    cfg["rope_parameters"], cfg["rope_scaling"] = {"rope_theta": 1e4, "rope_type": "default"}, scaling
    (path / "config.json").write_text(json.dumps(cfg))
    model_cfg = ModelConfig.from_dir(path)
    assert model_cfg.rope_scaling["rope_type"] == "yarn" and model_cfg.rope_theta == 1e4 and model_cfg.max_context == 32
    model = load_model(path, device="cpu", dtype="float32", attention=TorchAttention())
    seq = list(range(3, 23))
    torch.testing.assert_close(run_paged(model, [seq], [[20]])[0], hf_logits(path, seq), atol=ATOL, rtol=0)


def test_rope_theta_is_read_where_hf_reads_it() -> None:
    """With a rope_scaling beside rope_parameters, a top-level rope_theta wins over the replaced
    rope_parameters' (as HF's config reads it; the replaced one won before)."""
    from transformers import AutoConfig

    base = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64}
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}
    cases = [dict(rope_theta=1e6, rope_parameters={"rope_theta": 1e4, "rope_type": "default"}, rope_scaling=yarn),
             dict(rope_parameters={"rope_theta": 5e5, "rope_type": "default"}),
             dict(rope_theta=2e5)]
    for case in cases:
        ours = ModelConfig.from_dict(copy.deepcopy({**base, **case}))
        hf = AutoConfig.for_model(**copy.deepcopy({**base, **case})).rope_parameters  # HF edits the dicts it gets
        assert ours.rope_theta == hf["rope_theta"], case
        assert (ours.rope_scaling or {}).get("rope_type", "default") == hf["rope_type"], case
    # the one departure (rope_config.rope_of): with no top-level theta, the replaced rope_parameters' theta is the
    # checkpoint's, trained with, where HF's config falls back to its class default (1e4)
    kept = ModelConfig.from_dict({**base, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
                                  "rope_scaling": yarn})
    assert kept.rope_theta == 1e6 and kept.rope_scaling["rope_type"] == "yarn"
