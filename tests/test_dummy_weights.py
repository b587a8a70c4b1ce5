"""load_format="dummy": model directories holding only config.json, seeded random weights, token-id
prompts. Oracle: HF transformers models given the engine's own dummy weights, run through Eq. 3."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rast_engine import EngineConfig, LLMEngine, SamplingParams
from rast_engine.errors import ModelLoadError, RastError
from rast_engine.models.decoder import CausalLM
from rast_engine.models.loader import DUMMY_STD

LAM = 0.5
EOS = 3


def write_config(path: Path, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, inter: int,
                 tie: bool, eos: int | None = EOS) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=vocab, hidden_size=hidden,
               intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, tie_word_embeddings=tie, rope_theta=10000.0, rms_norm_eps=1e-6,
               hidden_act="silu", max_position_embeddings=256, torch_dtype="float32")
    if eos is not None:
        cfg["eos_token_id"] = eos
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dummy")
    large = write_config(root / "large", vocab=96, hidden=64, layers=2, heads=4, kv_heads=2, inter=128, tie=False)
    small = write_config(root / "small", vocab=80, hidden=32, layers=2, heads=4, kv_heads=2, inter=64, tie=True)
    return large, small


def engine(dirs: tuple[Path, Path], seed: int = 0, pair: bool = True) -> LLMEngine:
    large, small = map(str, dirs)
    extra = dict(small_rl=small, small_base=small, lam=LAM) if pair else {}
    return LLMEngine(EngineConfig(model=large, **extra, load_format="dummy", device="cpu", dtype="float32",
                                  block_size=4, kv_cache_blocks=64, seed=seed))


def run(eng: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    done: dict[str, list[int]] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[f"r{i}"] for i in range(len(prompts))]


def hf_from_engine(model: CausalLM, path: Path) -> torch.nn.Module:
    """An HF model holding exactly the engine model's weights (un-fusing q/k/v and gate/up)."""
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)), dtype=torch.float32).eval()
    state = {name: param.narrow(0, start, rows) for name, (param, start, rows) in model.weight_map().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied lm_head is the embedding
    return hf


PROMPTS = [[5, 17, 9, 40], [11, 2, 60], [7] * 6]


def test_generation_equals_hf_on_the_same_dummy_weights(dirs: tuple[Path, Path]) -> None:
    eng = engine(dirs)
    assert eng.tokenizer is None and eng.vocab_size == 80  # the narrowest model, no tokenizer
    large, rl, base = (hf_from_engine(m, d) for m, d in zip(eng.model_set.models, [dirs[0], dirs[1], dirs[1]]))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = run(eng, PROMPTS, params)
    V = eng.vocab_size
    for prompt, out in zip(PROMPTS, outs):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(params.max_tokens):
                x = torch.tensor([ids])
                z = large(x).logits[0, -1, :V] + LAM * (rl(x).logits[0, -1, :V] - base(x).logits[0, -1, :V])
                ids.append(int(z.argmax()))
        assert out == ids[len(prompt):]


def test_weights_have_config_shapes_and_scale(dirs: tuple[Path, Path]) -> None:
    models = engine(dirs).model_set.models
    large, rl, base = models
    assert tuple(large.lm_head.weight.shape) == (96, 64) and large.lm_head.weight is not large.embed_tokens.weight
    assert rl.lm_head.weight is rl.embed_tokens.weight  # tied as config.json says
    assert tuple(large.layers[0].self_attn.qkv_proj.weight.shape) == (64 + 2 * 32, 64)
    flat = torch.cat([p.detach().flatten() for n, p in large.named_parameters() if not n.endswith("norm.weight")])
    assert abs(float(flat.std()) - DUMMY_STD) < 0.1 * DUMMY_STD and abs(float(flat.mean())) < 1e-3
    assert all(bool((p == 1).all()) for n, p in large.named_parameters() if n.endswith("norm.weight"))
    # rl and base read one directory, yet each model of the set draws its own weights
    assert not torch.equal(rl.embed_tokens.weight, base.embed_tokens.weight)


def test_fixed_seed_reproduces_weights_and_samples(dirs: tuple[Path, Path]) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=123)
    a, b, c = engine(dirs, seed=5), engine(dirs, seed=5), engine(dirs, seed=6)
    for ma, mb, mc in zip(a.model_set.models, b.model_set.models, c.model_set.models):
        assert torch.equal(ma.lm_head.weight, mb.lm_head.weight)
        assert not torch.equal(ma.lm_head.weight, mc.lm_head.weight)
    assert run(a, PROMPTS, params) == run(b, PROMPTS, params)


def test_text_prompts_and_stop_strings_are_refused_clearly(dirs: tuple[Path, Path]) -> None:
    eng = engine(dirs, pair=False)
    with pytest.raises(RastError, match="no tokenizer.*token ids"):
        eng.add_request("t", "hello", SamplingParams())
    with pytest.raises(RastError, match="stop strings need a tokenizer"):
        eng.add_request("s", [1, 2], SamplingParams(stop=["x"]))
    with pytest.raises(RastError, match="outside the vocabulary"):
        eng.add_request("v", [96], SamplingParams())
    assert not eng.has_unfinished_requests()


def test_eos_comes_from_config_json(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    assert engine(dirs, pair=False).model_set.eos_token_ids == {EOS}
    bare = write_config(tmp_path / "bare", vocab=64, hidden=32, layers=1, heads=2, kv_heads=1, inter=32,
                        tie=True, eos=None)
    eng = LLMEngine(EngineConfig(model=str(bare), load_format="dummy", device="cpu", kv_cache_blocks=16,
                                 block_size=4))
    assert eng.model_set.eos_token_ids == set()
    # without eos and ignore_eos=False, generation runs to max_tokens
    assert [len(o) for o in run(eng, [[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=5))] == [5]


def test_config_validation_and_mixed_tokenizers(dirs: tuple[Path, Path], qwen2_triple: tuple) -> None:
    with pytest.raises(RastError, match="load_format"):
        EngineConfig(model=str(dirs[0]), load_format="pt")
    with pytest.raises(RastError, match="model_streams"):
        EngineConfig(model=str(dirs[0]), model_streams=1)
    with pytest.raises(ModelLoadError, match="tokenizer files"):
        LLMEngine(EngineConfig(model=str(qwen2_triple[0]), small_rl=str(dirs[1]), small_base=str(dirs[1]),
                               load_format="dummy", device="cpu", kv_cache_blocks=16))
    # a real directory loads as dummy too, keeping its tokenizer
    eng = LLMEngine(EngineConfig(model=str(qwen2_triple[0]), load_format="dummy", device="cpu",
                                 kv_cache_blocks=16, block_size=4))
    assert eng.tokenizer is not None and len(run(eng, [[5, 6]], SamplingParams(max_tokens=3,
                                                                                 ignore_eos=True))[0]) == 3
