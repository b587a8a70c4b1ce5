"""Speculative rounds in the GPU configuration: the GPU's kernels (Triton attention with the verify's
multi-token queries over the paged cache, layer ops, sampler), model streams (the pair's last step beside
M's verify) and rounds captured in CUDA graphs, on the CPU under tests/cuda_emulator.py (captures record,
replays re-issue with host values frozen, host reads inside a capture fail, cross-stream accesses must be
ordered); natively on a GPU under the `gpu` marker (bench/gpu_session.sh). The emulated captures run Triton
attention with torch layer ops and sampler: what they test is the capture and replay, and the interpreted
kernels are tested eagerly in the first test."""
from __future__ import annotations

import os

import pytest
import torch

from rast_engine import LLM, SamplingParams
from rast_engine.speculative import round as round_module
from rast_engine.speculative.round import round_core
from test_speculative import LAM, PROMPTS, _runs

CUDA = torch.device("cuda")  # under the emulator only a name: every tensor stays on the CPU
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU runs only (Triton interpreter)")
GPU_KERNELS = dict(lam=LAM, block_size=4, kv_cache_blocks=64, max_num_seqs=4, attention_backend="triton",
                   layer_ops="triton")


def _triton_llm(triple: tuple, **kw) -> LLM:
    llm = LLM(*triple, **GPU_KERNELS, **kw)
    llm.llm_engine.runner.sampler = "triton"
    return llm


def _capturable_llm(triple: tuple, **kw) -> LLM:
    """For what happens around the captured rounds rather than in their kernels: Triton attention (the torch
    backend reads lengths on the host), torch layer ops and sampler (the interpreter would take most of the
    time)."""
    llm = LLM(*triple, **{**GPU_KERNELS, "layer_ops": "torch"}, **kw)
    llm.llm_engine.runner.sampler = "torch"
    return llm


@interpreted
def test_rounds_in_the_gpu_configuration_under_the_cuda_emulator(near_triple: tuple,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager rounds, two small forwards (unstacked) and the large model on two streams: the greedy tokens
    of the plain engine."""
    from cuda_emulator import emulated_cuda
    from rast_engine.model_streams import ModelStreams

    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(*near_triple, **GPU_KERNELS).generate(PROMPTS[:2], greedy,
                                                                                      use_tqdm=False)]
    spec = _triton_llm(near_triple, speculative_tokens=2, stack_small_models=False)
    with emulated_cuda(monkeypatch):
        spec.llm_engine.runner.streams = ModelStreams(CUDA, True)
        got = [o.outputs[0].token_ids for o in spec.generate(PROMPTS[:2], greedy, use_tqdm=False)]
    assert got == want and spec.llm_engine.stats().spec_accepted_tokens_total > 0


def _token_runs(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple]:
    """Each request's (token ids, logprobs) through LLMEngine.step (token prompts: short prefills keep the
    interpreted kernels quick)."""
    engine = llm.llm_engine
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, sp)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: (o.outputs[0].token_ids, o.outputs[0].logprobs)
                     for o in engine.step() if o.finished})
    return [done[f"r{i}"] for i in range(len(prompts))]


@interpreted
@pytest.mark.parametrize("method", ["coupled", "rejection"])
def test_captured_rounds_equal_the_plain_engine_under_the_cuda_emulator(near_triple: tuple, method: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds replayed from a captured graph (bucket 4: three sequences and an inert padding row) on two
    streams: greedy requests (one with logprobs, read from the graph's logits) give the plain engine's
    tokens by either method, and a seeded sampled request gives its sampled tokens by the coupled one.
    The rounds at the context's end, which take fewer drafts, run eagerly between replays."""
    from cuda_emulator import emulated_cuda
    from rast_engine.cuda_graph import DecodeGraphs
    from rast_engine.model_streams import ModelStreams

    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    third = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=4, ignore_eos=True, seed=17) \
        if method == "coupled" else greedy
    params = [SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2), greedy, third]
    prompts = [[5, 17, 33, 9, 41, 8], [12, 7, 60, 3], [70, 22, 14, 9, 31]]  # the first ends at max_model_len
    want = _token_runs(_capturable_llm(near_triple, max_model_len=12), prompts, params)
    spec = _capturable_llm(near_triple, max_model_len=12, speculative_tokens=2, speculative_method=method)
    runner = spec.llm_engine.runner
    assert runner.round_graphs is None  # CPU: eager unless the emulator captures them below
    steps: list[int] = []
    round_step = runner._round_step
    eager: list[int] = []  # rounds run_round did not replay
    monkeypatch.setattr(round_module, "round_core", lambda *a: (eager.append(a[2]), round_core(*a))[1])
    with emulated_cuda(monkeypatch) as emu:
        runner.streams = ModelStreams(CUDA, True)
        runner.round_graphs = DecodeGraphs((lambda rows: (steps.append(rows), round_step(rows))[1],), runner._pad_all,
                                           CUDA, max_rows=4)
        runner.round_graphs.buckets = [4]  # the interpreter is slow: one bucket (the others are alike)
        runner.round_graphs.capture_all()
        assert steps == [4, 4]  # a warm-up, then the capture: replays never run the Python round
        got = _token_runs(spec, prompts, params)
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    mine, theirs = got[0][1], want[0][1]
    assert [sorted(a) for a in mine] == [sorted(b) for b in theirs]
    assert max(abs(a[k] - b[k]) for a, b in zip(mine, theirs) for k in a) < 1e-5
    assert emu.replays > 0 and steps == [4, 4] and eager and set(eager) == {1}  # only the shrunk rounds
    stats = spec.llm_engine.stats()
    assert 0 < stats.spec_accepted_tokens_total < stats.spec_draft_tokens_total  # both branches taken


@pytest.mark.gpu
@pytest.mark.parametrize("draft, method, eager", [("small", "coupled", False), ("rl", "rejection", False),
                                                  ("small", "coupled", True)])
def test_gpu_rounds_give_the_plain_greedy_tokens(near_triple: tuple, draft: str, method: str, eager: bool) -> None:
    """The round natively on a GPU (Triton attention, layer ops and sampler; model streams; captured in
    CUDA graphs unless enforce_eager; tokens read back through pinned copies and an event), float32: the
    plain engine's greedy tokens, with forks and a penalized request (its rounds run eagerly)."""
    kw = dict(lam=LAM, block_size=4, kv_cache_blocks=128, device="cuda", dtype="float32", max_model_len=48,
              max_num_seqs=8)
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=1),
              SamplingParams(temperature=0.0, max_tokens=9, n=2),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3,
                             logit_bias={7: 2.0})]
    plain = LLM(*near_triple, **kw)
    spec = LLM(*near_triple, speculative_tokens=4, speculative_draft=draft, speculative_method=method,
               enforce_eager=eager, **kw)
    runner = spec.llm_engine.runner
    assert runner.graphs is None and (runner.round_graphs is None) == eager and not spec.llm_engine.async_scheduling
    assert _runs(spec, params + params[:1]) == _runs(plain, params + params[:1])  # one request a prompt
    stats = spec.llm_engine.stats()
    assert 0 < stats.spec_accepted_tokens_total < stats.spec_draft_tokens_total


@interpreted
def test_rounds_are_not_captured_over_flash_attention(near_triple: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """Why a speculating engine captures rounds only over attention whose prefill path is capture-safe
    (cuda_graph.capture_safe): the round's verify is a prefill, and FlashAttention's prefill compares
    lengths on the host. Its decode path captures (plain decode graphs keep flash_attn)."""
    from cuda_emulator import EmulatorError, emulated_cuda
    from rast_engine.attention.flash_backend import FlashAttention
    from rast_engine.cuda_graph import DecodeGraphs, capture_safe
    from rast_engine.models.blocks import Attention

    class NoSyncFlash:  # flash_attn's two entry points, with no host read of their own
        def flash_attn_with_kvcache(self, q, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            return torch.zeros_like(q)

        def flash_attn_varlen_func(self, q, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            return torch.zeros_like(q)

    runner = _triton_llm(near_triple, speculative_tokens=2).llm_engine.runner
    flash = FlashAttention(NoSyncFlash())
    for module in (m for u in runner.units for m in u.modules() if isinstance(m, Attention)):
        module.backend = flash
    with emulated_cuda(monkeypatch):
        DecodeGraphs((runner._decode_forward, runner._decode_sample), runner._pad_all, CUDA, max_rows=2).ensure(2)
        with pytest.raises(EmulatorError, match="during CUDA-graph capture"):
            DecodeGraphs((runner._round_step,), runner._pad_all, CUDA, max_rows=2).ensure(2)
    assert capture_safe("flash_attn", speculative=False) and not capture_safe("flash_attn", speculative=True)
    assert capture_safe("triton", speculative=True) and not capture_safe("torch", speculative=False)


@interpreted
def test_adjusted_rounds_run_eagerly_beside_captured_ones_under_the_cuda_emulator(near_triple: tuple,
                                                                                  monkeypatch: pytest.MonkeyPatch
                                                                                  ) -> None:
    """A round's graph reads a fixed set of pairs, so a round holding a penalized request runs eagerly with
    its adjustment pair (speculative/adjust.py); once that request ends, the rounds replay again. Tokens:
    the plain engine's."""
    from cuda_emulator import emulated_cuda
    from rast_engine.cuda_graph import DecodeGraphs
    from rast_engine.model_streams import ModelStreams

    params = [SamplingParams(temperature=0.9, max_tokens=3, ignore_eos=True, seed=5, repetition_penalty=1.5,
                             logit_bias={7: 3.0}),
              SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)]
    prompts = [[12, 7, 60, 3], [70, 22, 14, 9, 31]]
    want = _token_runs(_capturable_llm(near_triple, max_model_len=24), prompts, params)
    spec = _capturable_llm(near_triple, max_model_len=24, speculative_tokens=2)
    runner = spec.llm_engine.runner
    eager: list[int] = []
    monkeypatch.setattr(round_module, "round_core", lambda *a: (eager.append(a[2]), round_core(*a))[1])
    with emulated_cuda(monkeypatch) as emu:
        runner.streams = ModelStreams(CUDA, True)
        runner.round_graphs = DecodeGraphs((runner._round_step,), runner._pad_all, CUDA, max_rows=4)
        runner.round_graphs.buckets = [4]
        runner.round_graphs.capture_all()
        got = _token_runs(spec, prompts, params)
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    assert 2 in eager and emu.replays > 0
