"""LoRA adapters loaded while the engine serves (engine/lora_registry.py): LLMEngine.load_lora_adapter /
unload_lora_adapter and a LoRARequest's path, into max_loras fixed slots. Oracle: the engine whose small_rl
is that adapter alone (test_lora.py checks it against PEFT), as in test_lora_modules.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from rast_engine import LLM, LoRARequest, SamplingParams
from rast_engine.errors import RastError
from test_engine import PROMPTS
from test_lora import make_adapter
from test_lora_modules import GREEDY, KW, SAMPLED, decode_three

pytest.importorskip("peft")


def _alone(lora_adapters: tuple, name: str, params: SamplingParams, prompts: list = PROMPTS) -> list[list[int]]:
    large, base, modules = lora_adapters
    llm = LLM(str(large), modules[name], str(base), **KW)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _tokens(llm: LLM, params: SamplingParams, lora: object, prompts: list = PROMPTS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False, lora_request=lora)]


def test_adapters_loaded_while_serving_decode_as_if_loaded_at_start(lora_adapters: tuple) -> None:
    large, base, modules = lora_adapters
    llm = LLM(str(large), small_base=str(base), lora_modules={"math": modules["math"]}, max_loras=2, max_lora_rank=4,
              **KW)
    engine = llm.llm_engine
    assert _tokens(llm, SAMPLED, "math") == _alone(lora_adapters, "math", SAMPLED)
    engine.load_lora_adapter("code", modules["code"])
    assert engine.lora_adapters() == modules
    for name in ("math", "code"):
        assert _tokens(llm, GREEDY, name) == _alone(lora_adapters, name, GREEDY)
    engine.add_request("busy", PROMPTS[0], GREEDY, lora_request="code")
    stats = engine.stats()
    assert (stats.max_loras, stats.lora_running, stats.lora_waiting) == (2, (), ("code",))
    engine.step()
    assert (engine.stats().lora_running, engine.stats().lora_waiting) == (("code",), ())
    with pytest.raises(RastError, match="used by live requests"):
        engine.unload_lora_adapter("code")
    engine.abort_request("busy")
    engine.unload_lora_adapter("code")
    assert engine.lora_adapters() == {"math": modules["math"]}
    with pytest.raises(RastError, match="not a loaded LoRA adapter"):
        engine.add_request("gone", PROMPTS[0], GREEDY, lora_request="code")
    # the name again, now math's weights: nothing code computed (its prefix-cache blocks) is reused
    engine.load_lora_adapter("code", modules["math"])
    assert _tokens(llm, GREEDY, "code") == _alone(lora_adapters, "math", GREEDY)


def test_a_lora_request_with_a_path_loads_it_and_evicts_an_idle_one(lora_adapters: tuple) -> None:
    large, base, modules = lora_adapters
    llm = LLM(str(large), small_base=str(base), max_loras=1, max_lora_rank=4, **KW)
    engine = llm.llm_engine
    math, code = LoRARequest("m", 1, modules["math"]), LoRARequest("c", 2, modules["code"])
    assert _tokens(llm, SAMPLED, math) == _alone(lora_adapters, "math", SAMPLED)
    engine.add_request("busy", PROMPTS[0], GREEDY, lora_request=math)
    engine.add_request("c0", PROMPTS[0], GREEDY, lora_request=code)  # m is in use: c waits (test_lora_queue.py)
    assert engine.groups["c0"].lora_slot == -1 and engine.lora_adapters() == {"m": modules["math"]}
    engine.abort_request(["busy", "c0"])
    assert _tokens(llm, GREEDY, code) == _alone(lora_adapters, "code", GREEDY)  # m was evicted for it
    assert engine.lora_adapters() == {"c": modules["code"]}


def test_what_does_not_fit_the_slots_is_refused_and_changes_nothing(lora_adapters: tuple, tmp_path: Path) -> None:
    large, base, modules = lora_adapters
    llm = LLM(str(large), small_base=str(base), max_loras=2, max_lora_rank=3, **KW)
    engine = llm.llm_engine
    with pytest.raises(RastError, match="rank 4 over max_lora_rank 3"):
        engine.load_lora_adapter("math", modules["math"])
    head = make_adapter(base, tmp_path / "head", seed=9, r=2, target_modules=["q_proj", "lm_head"],
                        save_embedding_layers=False)
    with pytest.raises(RastError, match="tied embeddings|more than the decoder's linear projections"):
        engine.load_lora_adapter("head", str(head))
    with pytest.raises(RastError, match="not a PEFT LoRA adapter"):
        engine.load_lora_adapter("base", str(base))
    engine.load_lora_adapter("code", modules["code"])
    with pytest.raises(RastError, match="already loaded"):
        engine.load_lora_adapter("code", modules["code"])
    assert engine.lora_adapters() == {"code": modules["code"]}
    assert _tokens(llm, GREEDY, "code") == _alone(lora_adapters, "code", GREEDY)
    assert LLM(str(large), small_base=str(base), enable_lora=True, **KW).llm_engine.model_set.lora.slots == [None]
    with pytest.raises(RastError, match="max_lora_rank is about LoRA slots"):
        LLM(str(large), small_base=str(base), max_lora_rank=4, **KW)
    with pytest.raises(RastError, match="no LoRA slots"):
        plain = LLM(str(large), **{k: v for k, v in KW.items() if k != "lam"})
        plain.llm_engine.load_lora_adapter("x", modules["code"])


def test_a_captured_step_reads_adapters_loaded_after_the_capture(lora_adapters: tuple,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The slots are written in place: graphs captured before a load replay it (CUDA emulator)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU runs only (Triton interpreter)")
    from cuda_emulator import emulated_cuda
    from test_emulated_fast_path import SAMPLED as EMULATED, install_fast_path, triton_engine

    large, base, modules = lora_adapters
    choices = ["code", None, "math"]
    want = decode_three(triton_engine((large, None, base), small_rl=None, lora_modules=modules), choices)
    fast = triton_engine((large, None, base), small_rl=None, max_loras=2, max_lora_rank=4)
    with emulated_cuda(monkeypatch) as emu:
        install_fast_path(fast.runner)
        for name, path in modules.items():
            fast.load_lora_adapter(name, path)
        assert decode_three(fast, choices) == want and emu.replays == 2 * (EMULATED.max_tokens - 1)


def test_a_waiting_adapter_loads_behind_a_captured_step_in_flight(lora_adapters: tuple,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """One slot, steps launched ahead and replayed from graphs on two streams (CUDA emulator): "math" waits
    for "code"'s request to end, then loads while the unadapted request's next step is already queued. The
    slot's writes, queued with no host sync (models/lora_slots.write_slot), race no step, and every request
    decodes as with both adapters loaded from the start."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU runs only (Triton interpreter)")
    from cuda_emulator import emulated_cuda
    from test_emulated_fast_path import install_fast_path, triton_engine

    large, base, modules = lora_adapters
    lengths = {"code": 2, None: 4, "math": 2}  # None outlives code, so math loads while it decodes ahead
    paths = {"code": LoRARequest("code", 1, modules["code"]), "math": LoRARequest("math", 2, modules["math"])}

    def decode(engine, by_path: bool) -> dict[str, list[int]]:  # noqa: ANN001 - an LLMEngine
        for i, (name, n) in enumerate(lengths.items()):
            params = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=n, ignore_eos=True, seed=7 + i)
            lora = paths.get(name) if by_path else name
            engine.add_request(f"r{i}", PROMPTS[i], params, lora_request=lora)
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        return done

    want = decode(triton_engine((large, None, base), small_rl=None, lora_modules=modules), by_path=False)
    fast = triton_engine((large, None, base), small_rl=None, max_loras=1, max_lora_rank=4, async_output=True)
    scheduler, ahead, loads = fast.scheduler, [False], []  # ahead: inside schedule_ahead (a step in flight)
    plan_ahead, load = scheduler.schedule_ahead, scheduler.load_lora

    def planned_ahead():  # noqa: ANN202
        ahead[0] = True
        try:
            return plan_ahead()
        finally:
            ahead[0] = False

    scheduler.schedule_ahead = planned_ahead
    scheduler.load_lora = lambda pending: (lambda ok: (loads.append((pending.name, ok, ahead[0])), ok)[1])(load(pending))
    with emulated_cuda(monkeypatch) as emu:
        install_fast_path(fast.runner)
        assert decode(fast, by_path=True) == want
    assert emu.replays > 0 and ("math", True, True) in loads


def test_adapters_that_would_poison_other_requests_are_refused(lora_adapters: tuple, tmp_path: Path) -> None:
    """A lora_B with an inf (a diverged run) would reach every token as 0 · inf = NaN, adapter-less ones
    included; an adapter with another tokenizer, or patterns that are no regex or number, is refused at run
    time as at start. Refusals leave the engine serving as before."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    large, base, modules = lora_adapters
    llm = LLM(str(large), small_base=str(base), lora_modules={"math": modules["math"]}, max_loras=2, **KW)
    engine, before = llm.llm_engine, _tokens(llm, GREEDY, [None, "math", None, "math"])
    inf = shutil.copytree(modules["code"], tmp_path / "inf")
    tensors = load_file(str(inf / "adapter_model.safetensors"))
    next(t for k, t in sorted(tensors.items()) if "lora_B" in k)[0, 0] = float("inf")
    save_file(tensors, str(inf / "adapter_model.safetensors"))
    other_tok = shutil.copytree(modules["code"], tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(large))
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.save_pretrained(str(other_tok))
    cases = [(inf, "NaN or infinite")] + [(other_tok, "tokenizer")]
    for key, value in (("rank_pattern", {"q_proj(": 2}), ("alpha_pattern", {"q_proj": "four"})):
        bad = shutil.copytree(modules["code"], tmp_path / key)
        config = json.loads((bad / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        cases.append((bad, "regex" if key == "rank_pattern" else "positive number"))
    for path, match in cases:
        with pytest.raises(RastError, match=match):
            engine.load_lora_adapter("bad", str(path))
        with pytest.raises(RastError, match=match):
            engine.add_request("r", PROMPTS[0], GREEDY, lora_request=LoRARequest("bad", 1, str(path)))
    assert engine.lora_adapters() == {"math": modules["math"]} and not engine.groups
    assert _tokens(llm, GREEDY, [None, "math", None, "math"]) == before
