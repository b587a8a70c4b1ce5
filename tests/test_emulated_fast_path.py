"""The GPU decode fast path (model streams, whole-step CUDA graphs, padded buckets) on the CPU, under the
CUDA emulator of tests/cuda_emulator.py: captures record the step and replays re-issue it with host
values frozen, host reads inside a capture fail, and every cross-stream access must be ordered by a wait.
Kernels are the GPU configuration's (Triton attention, layer ops and sampler, interpreted). The same paths run on
a real device in test_gpu_engine.py's `gpu` tests."""
from __future__ import annotations

import os

import pytest
import torch

from cuda_emulator import EmulatorError, Stream, emulated_cuda
from rast_engine import SamplingParams
from rast_engine.cuda_graph import DecodeGraphs
from rast_engine.model_streams import ModelStreams
from fast_path_util import GREEDY, generate, make_engine, prompts

# the emulator runs Triton kernels in the interpreter on CPU tensors (conftest turns it on without CUDA)
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU runs only (Triton interpreter)")

CUDA = torch.device("cuda")  # only a name here: every tensor stays on the CPU
SAMPLED = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, max_tokens=4, ignore_eos=True, seed=11)
SHORT_GREEDY = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
FORKED = SamplingParams(n=2, temperature=0.8, max_tokens=4, ignore_eos=True, seed=5)  # copy-on-write first


def generate_all(engine, batch: list[list[int]], params: SamplingParams) -> list[list[list[int]]]:  # noqa: ANN001
    """Every sample's tokens, per prompt."""
    for i, p in enumerate(batch):
        engine.add_request(f"r{i}", p, params)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: [c.token_ids for c in o.outputs] for o in engine.step() if o.finished})
    return [done[f"r{i}"] for i in range(len(batch))]


def triton_engine(triple: tuple, **kw):  # noqa: ANN201
    engine = make_engine(triple, attention_backend="triton", layer_ops="triton", max_num_seqs=8, **kw)
    engine.runner.sampler = "triton"
    return engine


def install_fast_path(runner) -> None:  # noqa: ANN001
    """Two model streams and one bucket's graphs, bucket 4 (the interpreter is slow; the others are alike):
    the forward's, then the sampler's. Inside emulated_cuda only."""
    runner.streams = ModelStreams(CUDA, True)
    runner.graphs = DecodeGraphs((runner._decode_forward, runner._decode_sample), runner._pad_all, CUDA, max_rows=4)
    runner.graphs.buckets = [4]
    runner.graphs.capture_all()


def assert_replays_equal_eager(triple: tuple, monkeypatch: pytest.MonkeyPatch, copies: list[int]) -> None:
    """One bucket captured on two streams: a sampled batch of 3 decodes as the eager engine does, whose
    forward units hold ``copies`` models each (the small ones stacked)."""
    want = generate_all(triton_engine(triple), prompts(3, seed=3), SAMPLED)
    engine = triton_engine(triple)
    assert [u.copies for u in engine.runner.units] == copies
    with emulated_cuda(monkeypatch) as emu:
        install_fast_path(engine.runner)
        got = generate_all(engine, prompts(3, seed=3), SAMPLED)
    assert got == want and emu.replays == 2 * (SAMPLED.max_tokens - 1)


def first_samples(engine, batch: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:  # noqa: ANN001
    """Each request's first sample's tokens, prompt i decoded under params[i]."""
    for i, (p, sp) in enumerate(zip(batch, params)):
        engine.add_request(f"r{i}", p, sp)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return [done[f"r{i}"] for i in range(len(batch))]


def record_ahead(engine) -> list[bool]:  # noqa: ANN001
    """Whether each schedule_ahead call scheduled a batch."""
    ahead, schedule_ahead = [], engine.scheduler.schedule_ahead
    engine.scheduler.schedule_ahead = lambda: (lambda out: (ahead.append(out is not None), out)[1])(schedule_ahead())
    return ahead


def test_graph_replay_and_model_streams_equal_the_eager_engine(qwen2_triple: tuple,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """One graph, bucket 4, on two streams: a batch of 3 replays it (one padding row), so do two forks of
    one prompt (their blocks copied first), a batch of 5 runs eagerly on both streams; every sample's
    tokens equal the eager single-stream engine's, which runs the small pair as two forwards where the
    fast path batches it into one."""
    cases = [(3, SAMPLED), (1, FORKED), (5, SHORT_GREEDY)]
    reference = triton_engine(qwen2_triple, stack_small_models=False)
    want = [generate_all(reference, prompts(n, seed=n), p) for n, p in cases]
    engine = triton_engine(qwen2_triple)
    runner = engine.runner
    assert [u.copies for u in runner.units] == [1, 2]  # the large model, then the pair stacked
    steps: list[int] = []
    forward = runner._decode_forward

    def counted(rows: int):  # noqa: ANN202
        steps.append(rows)
        return forward(rows)

    runner._decode_forward = counted  # the eager step calls it too
    copies: list = []
    copy_blocks = runner.kv.copy_blocks
    runner.kv.copy_blocks = lambda pairs: (copies.extend(pairs), copy_blocks(pairs))
    with emulated_cuda(monkeypatch) as emu:
        install_fast_path(runner)
        assert steps == [4, 4] and set(runner.graphs.graphs) == {4}  # a warm-up, then the capture
        forward_out, (_, logits) = runner.graphs.outputs[4]
        # the stages meet in the runner's static logits buffers
        assert [t.data_ptr() for t in logits] == [t.data_ptr() for t in forward_out] == [
            runner.step_logits[i].data_ptr() for i in runner.roles]
        got = [generate_all(engine, prompts(n, seed=n), p) for n, p in cases]
    assert got == want and copies  # the forks copied a block on main before the side stream read it
    assert emu.replays == 2 * (SAMPLED.max_tokens - 1 + FORKED.max_tokens - 1)  # two stages a step
    assert steps[2:] == [5] * (SHORT_GREEDY.max_tokens - 1)  # only the eager batch ran the Python step


def test_async_scheduling_replays_graphs_fed_by_the_previous_replay(qwen2_triple: tuple,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps launched ahead on the fast path: each replay gathers its input ids from the ids the previous
    replay stored, on the same stream, and the host reads each step's ids after the next is queued.
    Tokens equal the synchronous eager engine's; the emulator's race checks cover the feed."""
    reference = triton_engine(qwen2_triple, stack_small_models=False)
    batch = prompts(3, seed=3)
    want = generate_all(reference, batch, SAMPLED)
    engine = triton_engine(qwen2_triple, async_output=True)
    runner, ahead = engine.runner, record_ahead(engine)
    with emulated_cuda(monkeypatch) as emu:
        install_fast_path(runner)
        got = generate_all(engine, batch, SAMPLED)
    assert got == want and emu.replays == 2 * (SAMPLED.max_tokens - 1)
    assert ahead.count(True) == SAMPLED.max_tokens - 1  # every decode step went ahead, the first fed by the prefill


def test_fp8_weights_and_kv_cache_replay_in_graphs(qwen2_triple: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """quantization="fp8" and kv_cache_dtype="fp8" on the fast path: the FP8 linear kernel, the fused
    rotary store's float8 conversion and attention over FP8 caches captured in the step's graphs, on two
    streams, launched ahead. Tokens equal the eager single-stream engine's with the same settings."""
    fp8 = dict(quantization="fp8", kv_cache_dtype="fp8")
    batch = prompts(3, seed=8)
    want = generate_all(triton_engine(qwen2_triple, stack_small_models=False, **fp8), batch, SAMPLED)
    engine = triton_engine(qwen2_triple, async_output=True, **fp8)
    runner, ahead = engine.runner, record_ahead(engine)
    with emulated_cuda(monkeypatch) as emu:
        install_fast_path(runner)
        got = generate_all(engine, batch, SAMPLED)
    assert got == want and emu.replays == 2 * (SAMPLED.max_tokens - 1)
    assert ahead.count(True) == SAMPLED.max_tokens - 1


ADJUSTED = {"bias": SamplingParams(temperature=0.9, max_tokens=2, seed=7, min_tokens=2, stop_token_ids=[5],
                                   logit_bias={5: 2.0, 9: -3.0}),
            "penalty": SamplingParams(temperature=0.9, max_tokens=2, seed=7, repetition_penalty=1.5,
                                      frequency_penalty=0.8)}


@pytest.mark.parametrize("kind", sorted(ADJUSTED))
def test_adjusted_steps_replay_the_forward_and_sample_eagerly(qwen2_triple: tuple, monkeypatch: pytest.MonkeyPatch,
                                                               kind: str) -> None:
    """A batch holding a logit_bias / min_tokens or a penalized request replays the forward's graph, then
    adjusts (engine/logit_adjust.py) and samples eagerly from the static logits; both are launched ahead
    like the replays around them and fed from the ids they stored (a penalty counts the pending token
    from the step's input ids on the device). Once it finishes, the others replay both stages. Tokens
    equal the synchronous eager engine's, and the emulator's race checks cover the switches."""
    params = [SAMPLED, ADJUSTED[kind], SAMPLED]
    batch = prompts(3, seed=6)
    want = first_samples(triton_engine(qwen2_triple, stack_small_models=False), batch, params)
    engine = triton_engine(qwen2_triple, async_output=True)
    runner, ahead = engine.runner, record_ahead(engine)
    with emulated_cuda(monkeypatch) as emu:
        install_fast_path(runner)
        got = first_samples(engine, batch, params)
    assert got == want and len(got[1]) == 2 and (kind != "bias" or 5 not in got[1])
    # the first decode step held the adjusted request: its forward's graph alone; then both stages
    assert emu.replays == 1 + 2 * (SAMPLED.max_tokens - 2)
    assert ahead.count(True) == SAMPLED.max_tokens - 1  # every decode step went ahead


def test_a_prefill_ahead_reads_the_ids_a_replay_stored(qwen2_triple: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request arriving mid-run is admitted by a prefill launched ahead: the running sequences ride
    along, their input ids copied on the device from the ids the last replay stored. Tokens equal the
    synchronous eager engine's; the emulator's race checks cover the copy."""
    reference = triton_engine(qwen2_triple, stack_small_models=False)
    batch = prompts(4, seed=4)
    want = generate_all(reference, batch, SAMPLED)
    engine = triton_engine(qwen2_triple, async_output=True)
    runner, prefills, done = engine.runner, [], {}
    schedule_ahead = engine.scheduler.schedule_ahead

    def recorded():  # noqa: ANN202
        out = schedule_ahead()
        if out is not None and out.is_prefill:
            prefills.append(len(out.seqs))
        return out

    engine.scheduler.schedule_ahead = recorded
    with emulated_cuda(monkeypatch):
        install_fast_path(runner)
        for i, p in enumerate(batch):
            if i == 3:
                for _ in range(2):  # the prefill, then a replay in flight
                    engine.step()
            engine.add_request(f"r{i}", p, SAMPLED)
        while engine.has_unfinished_requests():
            done.update({o.request_id: [c.token_ids for c in o.outputs] for o in engine.step() if o.finished})
    assert [done[f"r{i}"] for i in range(4)] == want and prefills == [4]


def test_torch_attention_cannot_be_captured(qwen2_triple: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """Why CAPTURE_SAFE_ATTENTION excludes the torch backend: its decode path reads lengths on the host."""
    engine = make_engine(qwen2_triple, attention_backend="torch", max_num_seqs=8)
    runner = engine.runner
    with emulated_cuda(monkeypatch):
        graphs = DecodeGraphs((runner._decode_forward, runner._decode_sample), runner._pad_all, CUDA, max_rows=2)
        with pytest.raises(EmulatorError, match="during CUDA-graph capture"):
            graphs.ensure(2)


@pytest.mark.parametrize("dropped", ["side waits for main", "main waits for side"])
def test_model_streams_without_either_wait_race(qwen2_triple: tuple, monkeypatch: pytest.MonkeyPatch,
                                               dropped: str) -> None:
    """The two waits of ModelStreams.forward are both needed: without the first the small models read
    the step's inputs before they are written, without the second the sampler reads their logits early."""
    engine = triton_engine(qwen2_triple)
    with emulated_cuda(monkeypatch) as emu:
        engine.runner.streams = streams = ModelStreams(CUDA, True)
        wait = Stream.wait_stream

        def wait_but_one(self: Stream, other: Stream) -> None:
            skip = (self is streams.side) if dropped == "side waits for main" else (other is streams.side)
            if not skip:
                wait(self, other)

        monkeypatch.setattr(Stream, "wait_stream", wait_but_one)
        with pytest.raises(EmulatorError, match="race"):
            generate(engine, prompts(2), GREEDY)
        assert emu.replays == 0


@pytest.mark.parametrize("pairs", [0, 1])
def test_the_sampler_bench_captures_its_fused_call(monkeypatch: pytest.MonkeyPatch, pairs: int) -> None:
    """bench/sampler.py's fused-graph rows: the fused call it times, captured as it captures it. With a
    Python float λ this once copied host data inside the capture, which fails on a GPU."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_sampler", Path(__file__).parent.parent / "bench" / "sampler.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    gen = torch.Generator().manual_seed(pairs)
    logits = bench.lm_logits(3, 256, torch.device("cpu"), gen)
    deltas = [bench.rast_pair(3, 256, torch.device("cpu"), gen) for _ in range(pairs)]
    call = bench.ours(logits, deltas, 50, 0.05, torch.arange(3), "triton")
    outputs: list[torch.Tensor] = []
    with emulated_cuda(monkeypatch) as emu:
        replay = bench.graphed(lambda: outputs.append(call()), CUDA)
        assert len(outputs) == 2  # the warm-up and the capture, nothing since
        logits.copy_(bench.lm_logits(3, 256, torch.device("cpu"), gen))  # new inputs in the static tensors
        replay()
    assert emu.replays == 1 and outputs[1].tolist() == call().tolist()


def test_split_k_decode_attention_replays_with_new_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Split-K attention as a graph holds it: the split count is frozen at capture, each sequence's
    share of it follows the context lengths in the static tensor at every replay (here all shrink or
    grow past the split boundaries); replays equal eager calls on the same inputs."""
    from rast_kernels.paged_attention import paged_decode_attention

    gen = torch.Generator().manual_seed(0)
    blocks, bs = 24, 4
    k_cache, v_cache = torch.randn(2, blocks, bs, 2, 16, generator=gen)
    table = torch.randperm(blocks, generator=gen)[:18].view(3, 6).to(torch.int32)  # 24 tokens per row
    q, lens = torch.randn(3, 4, 16, generator=gen), torch.tensor([5, 24, 1], dtype=torch.int32)
    outs: list[torch.Tensor] = []
    with emulated_cuda(monkeypatch):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs.append(paged_decode_attention(q, k_cache, v_cache, table, lens, 0.25, num_splits=3,
                                               min_tokens_per_split=4))
        for new_lens in ([24, 3, 13], [9, 1, 24]):
            lens.copy_(torch.tensor(new_lens))
            q.copy_(torch.randn(3, 4, 16, generator=gen))
            graph.replay()
            eager = paged_decode_attention(q, k_cache, v_cache, table, lens, 0.25, num_splits=3,
                                           min_tokens_per_split=4)
            torch.testing.assert_close(outs[0], eager, atol=0, rtol=0)
