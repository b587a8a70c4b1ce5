"""Several LoRA RL models over one small base, chosen per request (engine/lora_modules.py). Oracle: each
request decodes as the engine whose small_rl is that adapter alone (itself checked against PEFT's loading
through HF's greedy loop in test_lora.py), or as M alone without one; and HF's greedy RAST loop over PEFT's
model directly, for a mixed batch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rast_engine import LLM, LoRARequest, SamplingParams
from rast_engine.errors import ModelLoadError, RastError
from test_engine import LAM, PROMPTS, hf_greedy

pytest.importorskip("peft")

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, ignore_eos=True, seed=11)
KW = dict(lam=LAM, block_size=4, kv_cache_blocks=96)


def decode_three(engine, choices: list) -> list[list[int]]:  # noqa: ANN001 - an LLMEngine
    """Three short token prompts (request i with adapter choices[i]) through LLMEngine.step, sampled as the
    emulated fast path's tests sample: each request's tokens."""
    from fast_path_util import prompts
    from test_emulated_fast_path import SAMPLED as EMULATED

    for i, (p, lora) in enumerate(zip(prompts(3, seed=3), choices)):
        engine.add_request(f"r{i}", p, EMULATED, lora_request=lora)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return [done[f"r{i}"] for i in range(3)]


def _multi(lora_adapters: tuple, **kw: object) -> LLM:
    large, base, modules = lora_adapters
    return LLM(str(large), small_base=str(base), lora_modules=modules, **{**KW, **kw})


def _single(lora_adapters: tuple, name: str | None) -> list[list[int]]:
    """Each prompt's tokens from the engine whose RL model is that one adapter (None: M alone)."""
    large, base, modules = lora_adapters
    llm = (LLM(str(large), block_size=4, kv_cache_blocks=96) if name is None
           else LLM(str(large), modules[name], str(base), **KW))
    return [[o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
            for params in (GREEDY, SAMPLED)]


@pytest.mark.parametrize("stack", [True, False])
def test_each_request_decodes_with_its_own_adapter_in_one_batch(lora_adapters: tuple, stack: bool) -> None:
    llm = _multi(lora_adapters, stack_small_models=stack)
    choices = ["math", LoRARequest("code", 2, lora_adapters[2]["code"]), None]
    want = {name: _single(lora_adapters, name) for name in ("math", "code", None)}
    assert len({str(w) for w in want.values()}) == 3  # the choice shows in the tokens
    for k, params in enumerate((GREEDY, SAMPLED)):
        prompts = [p for p in PROMPTS for _ in choices]  # every prompt under every choice, in one batch
        outs = llm.generate(prompts, params, use_tqdm=False, lora_request=choices * len(PROMPTS))
        for i, out in enumerate(outs):
            name = [c if c is None or isinstance(c, str) else c.lora_name for c in choices][i % len(choices)]
            assert out.outputs[0].token_ids == want[name][k][i // len(choices)], (name, params.temperature)


def test_triton_layer_ops_read_each_tokens_slot(lora_adapters: tuple) -> None:
    """The CUDA default's layer ops (interpreted here) add the deltas with rast_kernels.lora_slots, which reads
    only the slots the step's tokens use: each request still decodes as its adapter alone (torch ops)."""
    if torch.cuda.is_available():
        pytest.skip("interpreted on the CPU only; tests/test_gpu_lora.py runs the kernels on a GPU")
    llm = _multi(lora_adapters, layer_ops="triton")
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=4, ignore_eos=True, seed=11)
    choices = ["code", None, "math", "code"]
    outs = llm.generate([PROMPTS[0]] * 4, params, use_tqdm=False, lora_request=choices)
    large, base, modules = lora_adapters
    for choice, out in zip(choices, outs):
        single = (LLM(str(large), block_size=4, kv_cache_blocks=96) if choice is None
                  else LLM(str(large), modules[choice], str(base), **KW))
        assert out.outputs[0].token_ids == single.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].token_ids
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 3  # the choice shows in the tokens


def test_a_mixed_batch_matches_hf_greedy_over_peft(lora_adapters: tuple) -> None:
    large, base, modules = lora_adapters
    llm = _multi(lora_adapters)
    outs = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False, lora_request=["code", "math"])
    for out, name in zip(outs, ("code", "math")):
        assert out.outputs[0].token_ids == hf_greedy((large, Path(modules[name]), base), out.prompt_token_ids, LAM,
                                                     llm.llm_engine.vocab_size, GREEDY.max_tokens)


def test_the_prefix_cache_never_shares_r_across_adapters(lora_adapters: tuple) -> None:
    """One long prompt under each adapter in turn: a hit computed under another adapter would give R
    that adapter's keys and values."""
    llm = _multi(lora_adapters, enable_prefix_caching=True)
    prompt = list(range(3, 40))
    alone = {n: LLM(str(lora_adapters[0]), lora_adapters[2][n], str(lora_adapters[1]), **KW).generate(
        [prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for n in ("math", "code")}
    for name in ("math", "code", "math", "code"):
        assert llm.generate([prompt], GREEDY, use_tqdm=False, lora_request=name)[0].outputs[0].token_ids == alone[name]
    roots = {h for h in llm.llm_engine.block_manager.cached}
    assert len(roots) >= 2 * ((len(prompt) - 1) // 4)  # each adapter's prompt blocks cached under its own root


def test_speculative_rounds_and_scores_use_the_requests_adapter(lora_adapters: tuple) -> None:
    plain = _multi(lora_adapters)
    spec = _multi(lora_adapters, speculative_tokens=3)
    for name in ("math", "code", None):
        want = plain.generate(PROMPTS, SAMPLED, use_tqdm=False, lora_request=name)
        got = spec.generate(PROMPTS, SAMPLED, use_tqdm=False, lora_request=name)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want], name
    seq = [list(range(5, 17))]
    single = LLM(str(lora_adapters[0]), lora_adapters[2]["code"], str(lora_adapters[1]), **KW)
    torch.testing.assert_close(plain.score(seq, lora_request="code")[0].combined,
                               single.score(seq)[0].combined, rtol=0, atol=1e-5)


def test_bad_adapter_choices_and_configs_are_refused(lora_adapters: tuple, tmp_path: Path) -> None:
    large, base, modules = lora_adapters
    llm = _multi(lora_adapters)
    engine = llm.llm_engine
    for bad, match in (("law", "not a loaded LoRA adapter"), (LoRARequest("math", 1, modules["code"]),
                                                                          "was loaded from"), (3, "LoRARequest")):
        with pytest.raises(RastError, match=match):
            engine.add_request("r", PROMPTS[0], GREEDY, lora_request=bad)
        assert not engine.has_unfinished_requests()
    with pytest.raises(RastError, match="lora_requests for"):
        llm.generate(PROMPTS[:2], GREEDY, lora_request=["math"])
    with pytest.raises(RastError, match="serves no LoRA adapters"):
        LLM(str(large), block_size=4, kv_cache_blocks=96).generate(PROMPTS[:1], GREEDY, use_tqdm=False,
                                                                    lora_request="math")
    with pytest.raises(RastError, match="neither small_rl nor experts"):
        LLM(str(large), modules["math"], str(base), lora_modules=modules, **KW)
    with pytest.raises(RastError, match="non-empty dict"):
        LLM(str(large), small_base=str(base), lora_modules={}, **KW)
    with pytest.raises(ModelLoadError, match="not a PEFT LoRA adapter"):
        LLM(str(large), small_base=str(base), lora_modules={"m": modules["math"], "base": str(base)}, **KW)
    with pytest.raises(RastError, match="lora_int_id"):
        LoRARequest("math", 0)


def test_a_captured_decode_step_replays_each_rows_adapter(lora_adapters: tuple,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the CUDA emulator (tests/cuda_emulator.py) the stacked step, whose R rows read their slots
    from the decode buffers, captures and replays as the eager engine decodes, a padding row included."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU runs only (Triton interpreter)")
    from cuda_emulator import emulated_cuda
    from test_emulated_fast_path import SAMPLED as EMULATED, install_fast_path, triton_engine

    large, base, modules = lora_adapters

    def engine():  # noqa: ANN202
        return triton_engine((large, None, base), small_rl=None, lora_modules=modules)

    cases = (["code", None, "math"], ["math", "math", "code"])  # one capture replayed with other slots
    reference = engine()
    want = [decode_three(reference, choices) for choices in cases]
    fast = engine()
    with emulated_cuda(monkeypatch) as emu:
        install_fast_path(fast.runner)
        assert [decode_three(fast, choices) for choices in cases] == want
        assert emu.replays == 2 * 2 * (EMULATED.max_tokens - 1)


def test_captured_speculative_rounds_replay_each_rows_adapter(lora_adapters: tuple,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds replayed from a captured graph (bucket 4, one padding row), whose drafts and R terms read
    each row's slot from the decode buffers: the plain engine's tokens (coupled method), adapters mixed."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU runs only (Triton interpreter)")
    from cuda_emulator import emulated_cuda
    from rast_engine.cuda_graph import DecodeGraphs
    from test_emulated_fast_path import CUDA

    large, base, modules = lora_adapters
    kw = dict(small_base=str(base), lora_modules=modules, max_num_seqs=4, attention_backend="triton",
              layer_ops="triton", **KW)
    params = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=5, ignore_eos=True, seed=17)
    prompts, choices = [[5, 17, 33, 9, 41, 8], [12, 7, 60, 3], [70, 22, 14, 9, 31]], ["code", None, "math"]
    want = [o.outputs[0].token_ids for o in LLM(str(large), **kw).generate(prompts, params, use_tqdm=False,
                                                                           lora_request=choices)]
    spec = LLM(str(large), speculative_tokens=2, **kw)
    runner = spec.llm_engine.runner
    runner.sampler = "triton"
    with emulated_cuda(monkeypatch) as emu:
        runner.round_graphs = DecodeGraphs((runner._round_step,), runner._pad_all, CUDA, max_rows=4)
        runner.round_graphs.buckets = [4]
        runner.round_graphs.capture_all()
        got = [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False, lora_request=choices)]
    assert got == want and emu.replays > 0
