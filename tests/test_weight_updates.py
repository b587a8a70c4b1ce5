"""A loaded model's weights replaced in place (LLMEngine.load_weights, engine/weight_updates.py) and vLLM's
reset_prefix_cache. Oracle: an engine built on the new checkpoint from the start (test_models.py checks
the engine's models against HF transformers); every refusal leaves every weight as it was."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rast_engine import LLM, SamplingParams
from rast_engine.errors import RastError

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=8, ignore_eos=True, seed=5)
LONG = list(range(5, 37))  # eight full blocks of 4: cached after its first run
PROMPTS = [[5, 17, 33, 9, 41, 8], LONG]
KW = dict(block_size=4, kv_cache_blocks=96, lam=1.5)


def another_rl(triple: tuple, arch: str, root: Path) -> Path:
    """A second small RL checkpoint: R's architecture and tokenizer, other random weights."""
    from factories import make_model_dir

    return make_model_dir(root / f"rl2-{arch}", arch, vocab_width=112, hidden=32, layers=2, heads=4, kv_heads=2,
                          intermediate=64, seed=9, tie=True, tokenizer_dir=Path(triple[0]).parent / "tokenizer")


def tokens(llm: LLM, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def weights(llm: LLM) -> dict[str, torch.Tensor]:
    """Every model's tensors, by role and name (copies)."""
    engine = llm.llm_engine
    return {f"{role}/{name}": p.narrow(0, start, rows).clone() for role, m in zip(engine.model_set.roles,
                                                                                engine.model_set.models)
            for name, (p, start, rows) in m.weight_map().items()}


def unchanged(before: dict[str, torch.Tensor], llm: LLM) -> bool:
    after = weights(llm)
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
@pytest.mark.parametrize("source", ["path", "named"])
def test_a_new_rl_checkpoint_decodes_as_an_engine_built_on_it(arch: str, source: str, request: pytest.FixtureRequest,
                                                              tmp_path: Path) -> None:
    """R replaced from a checkpoint directory, or from an HF model's state_dict (a tied lm_head.weight
    included), after the engine served (its prefix cache holds LONG's blocks): greedy and sampled tokens
    equal the engine built on the new R, and differ from the old R's. Gemma's norms add 1 to the file's."""
    triple = request.getfixturevalue(f"{arch}_triple")
    large, rl, base = map(str, triple)
    rl2 = another_rl(triple, arch, tmp_path)
    want = [tokens(LLM(large, str(rl2), base, **KW), p) for p in (GREEDY, SAMPLED)]
    llm = LLM(large, rl, base, **KW)
    old = [tokens(llm, p) for p in (GREEDY, SAMPLED)]
    assert old != want  # the update is visible in the tokens
    if source == "path":
        written = llm.load_weights(path=str(rl2))
    else:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(rl2), dtype=torch.float32)
        written = llm.load_weights(hf.state_dict().items(), role="small_rl")
    assert written == len(llm.llm_engine.model_set.models[1].weight_map())
    assert [tokens(llm, p) for p in (GREEDY, SAMPLED)] == want


def test_the_prefix_cache_is_emptied_so_no_block_of_the_old_weights_is_reused(qwen2_triple: tuple,
                                                                             tmp_path: Path) -> None:
    """LONG's blocks were cached under the old R; after the update LONG is computed again (no hit), and
    reset_prefix_cache refuses while a request holds blocks."""
    large, rl, base = map(str, qwen2_triple)
    rl2 = another_rl(qwen2_triple, "qwen2", tmp_path)
    llm = LLM(large, rl, base, **KW)
    engine = llm.llm_engine
    tokens(llm)
    bm = engine.scheduler.bm
    hits = bm.prefix_hits
    llm.load_weights(path=str(rl2))
    assert not bm.cached and tokens(llm) == tokens(LLM(large, str(rl2), base, **KW))
    assert bm.prefix_hits == hits  # the first run after the update found nothing cached
    tokens(llm)
    assert bm.prefix_hits > hits  # the cache works again, on the new weights' blocks
    engine.add_request("held", LONG, GREEDY)
    engine.step()
    cached = dict(bm.cached)
    assert not llm.reset_prefix_cache() and bm.cached == cached
    engine.abort_request("held")
    assert llm.reset_prefix_cache() and not bm.cached


def test_what_does_not_fit_is_refused_and_changes_nothing(qwen2_triple: tuple, tmp_path: Path) -> None:
    large, rl, base = map(str, qwen2_triple)
    rl2 = another_rl(qwen2_triple, "qwen2", tmp_path)
    llm = LLM(large, rl, base, **KW)
    before = weights(llm)
    good = llm.llm_engine.model_set.models[1].weight_map()
    first = next(iter(good))
    ones = [(n, torch.ones(rows, *p.shape[1:])) for n, (p, _, rows) in good.items()]
    bad = {
        "an unknown name": ones[:3] + [("model.layers.9.mlp.up_proj.weight", torch.ones(64, 32))],
        "a wrong shape": ones[:3] + [(first, torch.ones(3, 3))],
        "an integer tensor": ones[:3] + [(first, torch.ones(good[first][2], 32, dtype=torch.int64))],
        "a name twice": ones[:3] + [ones[0]],
        "not pairs": ones[:3] + [torch.ones(2)],
    }
    for what, named in bad.items():
        with pytest.raises(RastError):
            llm.load_weights(named)
        assert unchanged(before, llm), what
    refusals = [dict(path=large),  # another architecture
                dict(path=str(rl2), role="small_base_typo"),
                dict(path=str(rl2), weights=ones),
                dict()]
    for kw in refusals:
        with pytest.raises(RastError):
            llm.load_weights(**kw)
        assert unchanged(before, llm), kw
    llm.llm_engine.add_request("live", PROMPTS[0], GREEDY)
    with pytest.raises(RastError, match="unfinished"):
        llm.load_weights(path=str(rl2))
    assert unchanged(before, llm)


def test_a_model_another_role_reads_is_refused(qwen2_triple: tuple, tmp_path: Path) -> None:
    """M given as its own small base (contrastive decoding's M, M, S): one loaded model for two roles."""
    large, rl, base = map(str, qwen2_triple)
    llm = LLM(base, rl, base, **KW)
    before = weights(llm)
    with pytest.raises(RastError, match="same loaded model"):
        llm.load_weights(path=base, role="model")
    assert unchanged(before, llm)
    assert llm.load_weights(path=str(another_rl(qwen2_triple, "qwen2", tmp_path))) > 0  # R is its own


def test_an_rl_lora_adapter_over_its_base_is_refused(lora_adapters: tuple) -> None:
    pytest.importorskip("peft")
    large, base, modules = lora_adapters
    llm = LLM(str(large), modules["math"], str(base), **KW)
    before = weights(llm)
    for role in ("small_rl", "small_base"):
        with pytest.raises(RastError, match="shares its tensors"):
            llm.load_weights(path=str(base), role=role)
    assert unchanged(before, llm)


def test_fp8_weights_are_quantised_again_and_non_finite_ones_refused(qwen2_triple: tuple, tmp_path: Path) -> None:
    """M in FP8 (the torch spec on the CPU) replaced by its own checkpoint after a perturbation, then
    back: the engine built on the perturbed M in FP8 decodes the same; a NaN is refused before any write."""
    from safetensors.torch import load_file, save_file

    large, rl, base = map(str, qwen2_triple)
    fp8 = dict(quantization="fp8", **KW)
    m2 = tmp_path / "m2"
    m2.mkdir()
    for f in Path(large).iterdir():
        (m2 / f.name).write_bytes(f.read_bytes())
    shard = next(m2.glob("*.safetensors"))
    tensors = load_file(str(shard))
    tensors = {k: v * 1.5 if k.endswith("mlp.up_proj.weight") else v for k, v in tensors.items()}
    save_file(tensors, str(shard), metadata={"format": "pt"})
    llm = LLM(large, rl, base, **fp8)
    llm.load_weights(path=str(m2), role="model")
    assert tokens(llm, SAMPLED) == tokens(LLM(str(m2), rl, base, **fp8), SAMPLED)
    before = weights(llm)
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(RastError, match="not finite"):
        llm.load_weights([("model.layers.0.mlp.gate_proj.weight", tensors["model.layers.0.mlp.gate_proj.weight"]),
                          (name, torch.full_like(tensors[name], float("nan")))], role="model")
    assert unchanged(before, llm)


def test_captured_graphs_replay_the_new_weights(qwen2_triple: tuple, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Graphs captured on two streams with R and S stacked (CUDA emulator) replay the weights written
    after the capture: the tensors keep their addresses, the stacked ones included."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU runs only (Triton interpreter)")
    from cuda_emulator import emulated_cuda
    from fast_path_util import capturable_engine, prompts
    from test_emulated_fast_path import SAMPLED as EMULATED, generate_all, install_fast_path

    large, _, base = qwen2_triple
    rl2 = another_rl(qwen2_triple, "qwen2", tmp_path)
    batch = prompts(3, seed=3)
    want = generate_all(capturable_engine((large, rl2, base), stack_small_models=False), batch, EMULATED)
    fast = capturable_engine(qwen2_triple)
    assert [u.copies for u in fast.runner.units] == [1, 2]
    with emulated_cuda(monkeypatch) as emu:
        install_fast_path(fast.runner)
        before = generate_all(fast, batch, EMULATED)
        fast.load_weights(path=str(rl2))
        got = generate_all(fast, batch, EMULATED)
    assert got == want != before and emu.replays == 4 * (EMULATED.max_tokens - 1)


@pytest.mark.gpu
def test_pinned_sources_are_copied_before_load_weights_returns(qwen2_triple: tuple, tmp_path: Path) -> None:
    """Copies from pinned host tensors are queued, not waited for one by one; the load waits once at its
    end, so a caller that overwrites its tensors right after does not change the weights."""
    from transformers import AutoModelForCausalLM

    large, rl, base = map(str, qwen2_triple)
    rl2 = another_rl(qwen2_triple, "qwen2", tmp_path)
    gpu = dict(device="cuda", dtype="float32", max_num_seqs=8, **KW)
    want = tokens(LLM(large, str(rl2), base, **gpu))
    llm = LLM(large, rl, base, **gpu)
    pinned = [(n, t.pin_memory()) for n, t in
              AutoModelForCausalLM.from_pretrained(str(rl2), dtype=torch.float32).state_dict().items()]
    llm.load_weights(pinned)
    for _, t in pinned:
        t.fill_(float("nan"))
    assert tokens(llm) == want
