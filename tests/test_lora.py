"""An RL model given as a PEFT LoRA adapter over its base (engine/models/lora.py). Oracle: transformers'
own loading of the adapter directory (PEFT's unmerged LoRA layers over the base), through the same HF
greedy RAST loop as every other triple; and what is refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rast_engine import LLM, SamplingParams
from rast_engine.errors import ModelLoadError
from rast_engine.models.lora import LoraAdapter, LoraLinear
from test_engine import LAM, PROMPTS, hf_greedy

peft = pytest.importorskip("peft")  # the dev extra's

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, seed: int, save_embedding_layers: object = "auto", **lora: object) -> Path:
    """A LoRA adapter over ``base`` with random A and B (PEFT starts B at zero: no delta), saved by PEFT."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **lora})
    wrapped = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    wrapped.save_pretrained(str(out), save_embedding_layers=save_embedding_layers)
    return out


@pytest.fixture(scope="module")
def lora_triple(qwen2_triple: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(large, an adapter over the small base, the small base)."""
    large, _, base = qwen2_triple
    return large, make_adapter(base, tmp_path_factory.mktemp("lora") / "adapter", seed=5), base


@pytest.mark.parametrize("stack", [True, False])
def test_an_adapter_as_the_rl_model_decodes_as_hf_loads_it(lora_triple: tuple, stack: bool) -> None:
    llm = LLM(*map(str, lora_triple), lam=LAM, block_size=4, kv_cache_blocks=64, stack_small_models=stack)
    for out in llm.generate(PROMPTS, GREEDY, use_tqdm=False):
        assert out.outputs[0].token_ids == hf_greedy(lora_triple, out.prompt_token_ids, LAM,
                                                     llm.llm_engine.vocab_size, GREEDY.max_tokens)
    units = llm.llm_engine.runner.units
    if stack:  # one stacked unit whose projections read the shared weight once, R's rows given their LoRA
        qkv = units[1].layers[0].self_attn.qkv_proj
        assert len(units) == 2 and qkv.shared is not None and [lora is not None for lora in qkv.loras] == [True, False]
    else:  # R is the base's own tensors (no copy) plus LoRA projections
        rl, base = units[1:]
        assert rl.layers[0].self_attn.qkv_proj.weight is base.layers[0].self_attn.qkv_proj.weight
        assert isinstance(rl.layers[0].self_attn.qkv_proj, LoraLinear) and rl.embed_tokens.weight is base.embed_tokens.weight


def test_rslora_and_per_module_patterns_scale_as_peft(qwen2_triple: tuple, tmp_path: Path) -> None:
    """rank_pattern / alpha_pattern give some modules their own rank and alpha; use_rslora divides by √r."""
    large, _, base = qwen2_triple
    patterned = make_adapter(base, tmp_path / "patterned", seed=6, rank_pattern={"down_proj": 2},
                             alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3.0})
    rs = make_adapter(base, tmp_path / "rs", seed=7, use_rslora=True, r=8, rank_pattern={"o_proj": 2})
    adapter = LoraAdapter.from_dir(patterned)
    assert adapter.rank_and_scale("model.layers.0.mlp.down_proj") == (2, 4.0)
    assert adapter.rank_and_scale("model.layers.1.self_attn.q_proj") == (4, 0.75)
    assert adapter.rank_and_scale("model.layers.0.self_attn.q_proj") == (4, 2.0)
    assert LoraAdapter.from_dir(rs).rank_and_scale("model.layers.0.mlp.up_proj") == (8, 8 / 8 ** 0.5)
    assert LoraAdapter.from_dir(rs).rank_and_scale("model.layers.1.self_attn.o_proj") == (2, 8 / 2 ** 0.5)
    for adapter_dir in (patterned, rs):
        triple = (large, adapter_dir, base)
        llm = LLM(*map(str, triple), lam=LAM, block_size=4, kv_cache_blocks=64)
        out = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
        for o in out:
            assert o.outputs[0].token_ids == hf_greedy(triple, o.prompt_token_ids, LAM, llm.llm_engine.vocab_size,
                                                       GREEDY.max_tokens)


def _edited(adapter: Path, tmp_path: Path, **changes: object) -> Path:
    copy = Path(shutil.copytree(adapter, tmp_path / "edited"))
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg.update(changes)
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    return copy


@pytest.mark.parametrize("changes, match", [
    ({"use_dora": True}, "use_dora"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),  # PEFT rewrites the base's weight as it loads it
    ({"init_lora_weights": "olora"}, "init_lora_weights"),
    ({"r": "4"}, "positive number"),
    ({"bias": "lora_only"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "only LoRA"),
    ({"r": 5}, "do not fit"),
])
def test_adapters_beyond_plain_lora_are_refused_by_name(lora_triple: tuple, tmp_path: Path, changes: dict,
                                                        match: str) -> None:
    large, adapter, base = lora_triple
    with pytest.raises(ModelLoadError, match=match):
        LLM(str(large), str(_edited(adapter, tmp_path, **changes)), str(base), kv_cache_blocks=16)


def test_an_adapter_in_a_base_role_or_over_another_shape_is_refused(lora_triple: tuple,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    large, adapter, base = lora_triple
    with pytest.raises(ModelLoadError, match="only an RL model"):
        LLM(str(large), str(base), str(adapter), kv_cache_blocks=16)
    with pytest.raises(ModelLoadError, match="small_rl: .*do not fit"):  # over the large model: 64 wide, not 32
        LLM(str(large), str(adapter), str(large), kv_cache_blocks=16)
    assert "trained over" in caplog.text  # its adapter_config.json names the small base


def test_one_adapter_over_two_bases_is_two_models(lora_triple: tuple, qwen2_triple: tuple) -> None:
    """Experts sharing an adapter directory over different bases (of one shape) get the adapter merged into
    each base: the same delta on two weights, not the first merge reused."""
    large, adapter, base = lora_triple
    other = qwen2_triple[1]
    llm = LLM(str(large), experts=[(str(adapter), str(base), 0.5), (str(adapter), str(other), 0.5)],
              block_size=4, kv_cache_blocks=32, stack_small_models=False)
    _, r1, s1, r2, s2 = llm.llm_engine.runner.units
    assert r1.layers[0].mlp.down_proj.weight is s1.layers[0].mlp.down_proj.weight
    assert r2.layers[0].mlp.down_proj.weight is s2.layers[0].mlp.down_proj.weight
    assert s1.layers[0].mlp.down_proj.weight is not s2.layers[0].mlp.down_proj.weight


def test_an_lm_head_lora_merges_into_an_untied_head_and_is_refused_over_a_tied_one(lora_triple: tuple,
                                                                                  tmp_path: Path) -> None:
    """PEFT saves a copy of an adapted head's own weight beside its A and B (save_embedding_layers): read as
    the base's. Over the large model (untied) as its own base, the engine decodes as HF loads the adapter;
    over a tied small base the adapter would untie the head, and is refused."""
    large, _, base = lora_triple
    head = make_adapter(large, tmp_path / "head", seed=8, target_modules=["q_proj", "lm_head"])
    from safetensors import safe_open

    with safe_open(str(head / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.lm_head.base_layer.weight" in f.keys()
    triple = (large, head, large)
    llm = LLM(*map(str, triple), lam=LAM, block_size=4, kv_cache_blocks=64)
    for o in llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False):
        assert o.outputs[0].token_ids == hf_greedy(triple, o.prompt_token_ids, LAM, llm.llm_engine.vocab_size,
                                                   GREEDY.max_tokens)
    LLM(*map(str, triple), load_format="dummy", kv_cache_blocks=16)  # no saved copy equals dummy weights
    for saved in (False, "auto"):  # PEFT's default saves the tied head's copy too: the embedding's
        tied = make_adapter(base, tmp_path / f"tied-{saved}", seed=9, target_modules=["q_proj", "lm_head"],
                            save_embedding_layers=saved)
        with pytest.raises(ModelLoadError, match="tied embeddings"):
            LLM(str(large), str(tied), str(base), kv_cache_blocks=16)


def test_an_adapter_saved_with_copies_of_tied_embeddings_decodes_as_hf_loads_it(lora_triple: tuple,
                                                                                 tmp_path: Path) -> None:
    """save_embedding_layers=True over a tied small base (Qwen2.5-1.5B, Llama-3.2-1B) saves the embedding
    and the head, one matrix: both copies are the base's."""
    large, _, base = lora_triple
    adapter = make_adapter(base, tmp_path / "copies", seed=10, target_modules=["q_proj", "v_proj"],
                           save_embedding_layers=True)
    triple = (large, adapter, base)
    llm = LLM(*map(str, triple), lam=LAM, block_size=4, kv_cache_blocks=64)
    for o in llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False):
        assert o.outputs[0].token_ids == hf_greedy(triple, o.prompt_token_ids, LAM, llm.llm_engine.vocab_size,
                                                   GREEDY.max_tokens)


def test_an_adapter_over_a_multimodal_gemma3_base(gemma3_triple: tuple, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """PEFT names a multimodal Gemma 3 base's language model model.language_model.*: those modules merge into
    the language model the engine serves; the vision tower's adapted q/v are skipped with a warning. Greedy
    RAST equals HF loading the adapter over the multimodal model."""
    from transformers import AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig

    large, _, small = gemma3_triple
    text = {k: v for k, v in json.loads((small / "config.json").read_text()).items()
            if k not in ("architectures", "model_type", "transformers_version")}
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=Gemma3TextConfig(**text), vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=99, boi_token_index=98, eoi_token_index=97)
    torch.manual_seed(0)
    multimodal = tmp_path / "multimodal"
    Gemma3ForConditionalGeneration(config).eval().save_pretrained(str(multimodal))
    AutoTokenizer.from_pretrained(str(small)).save_pretrained(str(multimodal))
    adapter = make_adapter(multimodal, tmp_path / "adapter", seed=10, target_modules=["q_proj", "v_proj", "down_proj"])
    triple = (large, adapter, multimodal)
    with caplog.at_level("WARNING", logger="rast"):
        llm = LLM(*map(str, triple), lam=LAM, block_size=4, kv_cache_blocks=64)
    assert "vision_tower" in caplog.text and "not read" in caplog.text
    for o in llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False):
        assert o.outputs[0].token_ids == hf_greedy(triple, o.prompt_token_ids, LAM, llm.llm_engine.vocab_size,
                                                   GREEDY.max_tokens)


def test_the_fused_kernels_and_a_captured_step_read_the_shared_weights(lora_triple: tuple,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton layer ops and attention (interpreted) give HF's greedy tokens with the adapter's model stacked
    on its base; and under the CUDA emulator (tests/cuda_emulator.py) the stacked step with its LoRA rows
    captures and replays as the eager engine decodes."""
    import os

    llm = LLM(*map(str, lora_triple), lam=LAM, block_size=4, kv_cache_blocks=64, layer_ops="triton",
              attention_backend="triton")
    for o in llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False):
        assert o.outputs[0].token_ids == hf_greedy(lora_triple, o.prompt_token_ids, LAM, llm.llm_engine.vocab_size,
                                                   GREEDY.max_tokens)
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from test_emulated_fast_path import assert_replays_equal_eager

    assert_replays_equal_eager(lora_triple, monkeypatch, [1, 2])


def test_speculative_rounds_drafted_by_the_shared_pair_give_the_plain_tokens(lora_triple: tuple) -> None:
    kw = dict(lam=LAM, block_size=4, kv_cache_blocks=64)
    plain = LLM(*map(str, lora_triple), **kw)
    spec = LLM(*map(str, lora_triple), speculative_tokens=3, **kw)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=4, ignore_eos=True)
    for p in (GREEDY, params):
        assert ([o.outputs[0].token_ids for o in spec.generate(PROMPTS, p, use_tqdm=False)] ==
                [o.outputs[0].token_ids for o in plain.generate(PROMPTS, p, use_tqdm=False)])


def test_the_pairs_weight_bytes_count_the_shared_base_once(lora_triple: tuple) -> None:
    """rast analyze accept's bytes of the pair (its speed-up bound): S's weights once plus the adapter's, and
    nothing of a base that is the large model."""
    from rast_engine.analysis.accept import weight_bytes

    large, adapter, base = map(str, lora_triple)
    m, r, s = LLM(large, adapter, base, kv_cache_blocks=16).llm_engine.model_set.models
    own = lambda model: sum(p.numel() * p.element_size() for p in model.parameters())  # noqa: E731
    lora = sum(t.numel() * t.element_size() for n, t in r.named_parameters() if "lora_" in n)
    assert lora > 0 and weight_bytes(r, s, besides=m) == own(s) + lora
    over_m = make_adapter(Path(large), Path(adapter).parent / "over_large", seed=11)
    m, r, s = LLM(large, str(over_m), large, kv_cache_blocks=16).llm_engine.model_set.models
    assert s is m and weight_bytes(r, s, besides=m) == sum(t.numel() * t.element_size()
                                                           for n, t in r.named_parameters() if "lora_" in n)
