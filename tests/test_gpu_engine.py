"""The decode fast path on a real GPU (`gpu` tests), each against its slow twin: graph replay vs eager,
two streams vs one, triton vs torch attention, stacked vs unstacked small models, GPU vs CPU float32,
asynchronous vs synchronous outputs, and one device read per decode step."""
from __future__ import annotations

import importlib.util

import warnings
from typing import Callable

import pytest
import torch

from fast_path_util import GREEDY, SAMPLED, generate, make_engine, prompts
from rast_engine import EngineConfig, LLMEngine, SamplingParams
from rast_engine.cuda_graph import batch_buckets


# ---- GPU ---------------------------------------------------------------------------------------------
def _record_logits(engine: LLMEngine) -> list[list[torch.Tensor]]:
    """Every forward_logits call's outputs (eager engines only: graph replay bypasses the call)."""
    runner, calls = engine.runner, []
    forward = runner.forward_logits

    def recording(inputs, rows, outs=None):  # noqa: ANN001, ANN202
        out = forward(inputs, rows, outs)
        calls.append([t.float().cpu() for t in out])
        return out

    runner.forward_logits = recording
    return calls


def _assert_close_until_divergence(calls: list, ref_calls: list, outs: list, ref_outs: list, **tol: float) -> None:
    """Every model's logits of every step up to the first step where any sequence's tokens differ, and of
    that step too (its flip must be a near-tie of close logits). Past it the two engines read different
    tokens, so their logits are no longer comparable."""
    first = min(next((t for t in range(len(a)) if a[t] != b[t]), len(a)) for a, b in zip(outs, ref_outs))
    steps = min(first + 1, len(calls), len(ref_calls))
    for t in range(steps):
        for got, ref in zip(calls[t], ref_calls[t]):
            torch.testing.assert_close(got, ref, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replay_equals_eager(qwen2_triple: tuple, dtype: str) -> None:
    eager = make_engine(qwen2_triple, "cuda", dtype=dtype, attention_backend="triton", enforce_eager=True)
    graph = make_engine(qwen2_triple, "cuda", dtype=dtype, attention_backend="triton", enforce_eager=False)
    assert eager.runner.graphs is None and graph.runner.graphs is not None
    # bucket sizes: the same kernels on the same shapes, so the logits are bit-equal in float32; bf16
    # checks greedy tokens only (a tiny model's greedy margins dwarf any rounding)
    for n in (1, 2, 4, 8):
        for params in (GREEDY, SAMPLED) if dtype == "float32" else (GREEDY,):
            batch = prompts(n, seed=n)
            assert generate(graph, batch, params) == generate(eager, batch, params)
    assert set(graph.runner.graphs.graphs) == set(batch_buckets(16))
    # a padded batch: the graph of bucket 8 runs 5 rows; greedy on clearly separated logits
    if dtype == "float32":
        batch = prompts(5, seed=5)
        assert generate(graph, batch, GREEDY) == generate(eager, batch, GREEDY)


@pytest.mark.gpu
def test_every_bucket_is_captured_at_start_without_touching_the_kv_cache(qwen2_triple: tuple) -> None:
    engine = make_engine(qwen2_triple, "cuda", dtype="bfloat16", attention_backend="triton")
    graphs = engine.runner.graphs
    assert set(graphs.graphs) == set(batch_buckets(16)) and graphs.pool is not None
    for pool in engine.kv.pools:  # the warm-up runs before each capture wrote no slot: padding is inert
        assert all(not k.any() and not v.any() for k, v in pool)
    captured = dict(graphs.graphs)
    generate(engine, prompts(5, seed=3), GREEDY)
    assert graphs.graphs == captured  # serving captured nothing more


@pytest.mark.gpu
def test_batches_above_the_graph_cap_decode_eagerly(qwen2_triple: tuple) -> None:
    kw = dict(dtype="float32", attention_backend="triton")
    eager = make_engine(qwen2_triple, "cuda", enforce_eager=True, **kw)
    capped = make_engine(qwen2_triple, "cuda", cuda_graph_max_batch=4, **kw)
    graphs = capped.runner.graphs
    assert graphs.buckets == [1, 2, 4] and set(graphs.graphs) == {1, 2, 4}
    replayed: list[int] = []
    replay = graphs.replay
    graphs.replay = lambda rows, **kw: (replayed.append(rows), replay(rows, **kw))[1]
    # 3 rows replay bucket 4 (greedy: padding changes GEMM shapes, hence rounding); above the cap the
    # eager step runs the eager engine's shapes, so sampled tokens match too
    for n, bucket, cases in ((3, 4, (GREEDY,)), (6, None, (GREEDY, SAMPLED)), (16, None, (GREEDY, SAMPLED))):
        replayed.clear()
        for params in cases:
            batch = prompts(n, seed=50 + n)
            assert generate(capped, batch, params) == generate(eager, batch, params)
        assert set(replayed) == ({bucket} if bucket else set())


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_concurrent_streams_equal_sequential(qwen2_triple: tuple, enforce_eager: bool) -> None:
    kw = dict(dtype="bfloat16", attention_backend="triton", enforce_eager=enforce_eager)
    one = make_engine(qwen2_triple, "cuda", model_streams=False, **kw)
    two = make_engine(qwen2_triple, "cuda", model_streams=True, **kw)
    assert two.runner.streams.concurrent and not one.runner.streams.concurrent
    for n in (1, 3, 8):
        for params in (GREEDY, SAMPLED):
            batch = prompts(n, seed=10 + n)
            assert generate(two, batch, params) == generate(one, batch, params)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_attention_equals_torch_in_the_engine(qwen2_triple: tuple, dtype: str) -> None:
    """float32: the same greedy tokens and logits within float32 rounding at every step. bfloat16: logits
    at bf16 tolerance up to where the tokens first diverge (a random tiny model has bf16 near-ties: on the
    H100 at 8759dcb three of four sequences flipped a token within 10 steps)."""
    kw = dict(dtype=dtype, enforce_eager=True)
    ref = make_engine(qwen2_triple, "cuda", attention_backend="torch", **kw)
    tri = make_engine(qwen2_triple, "cuda", attention_backend="triton", **kw)
    ref_calls, tri_calls = _record_logits(ref), _record_logits(tri)
    batch = prompts(4, seed=21)
    ref_out, tri_out = generate(ref, batch, GREEDY), generate(tri, batch, GREEDY)
    assert len(ref_calls) == len(tri_calls) == GREEDY.max_tokens  # one prefill, then decode steps
    if dtype == "float32":
        assert tri_out == ref_out
        tol = dict(atol=1e-4, rtol=1e-4)
    else:
        tol = dict(atol=6e-2, rtol=3e-2)
    _assert_close_until_divergence(tri_calls, ref_calls, tri_out, ref_out, **tol)


@pytest.mark.gpu
def test_stacked_small_models_equal_unstacked_on_gpu(qwen2_triple: tuple) -> None:
    """The (rl, base) pair as one batched forward (bmm over stacked weights, one attention call over 2B
    sequences) against the pair as two forwards, in bf16 on CUDA: every step's logits (eager), then the
    tokens of the graph-captured engines on two streams."""
    kw = dict(dtype="bfloat16", attention_backend="triton")
    eager = [make_engine(qwen2_triple, "cuda", enforce_eager=True, stack_small_models=s, **kw) for s in (False, True)]
    assert [len(e.runner.units) for e in eager] == [3, 2]
    calls = [_record_logits(e) for e in eager]
    batch = prompts(4, seed=23)
    outs = [generate(e, batch, GREEDY) for e in eager]
    _assert_close_until_divergence(calls[1], calls[0], outs[1], outs[0], atol=6e-2, rtol=3e-2)
    graphed = [make_engine(qwen2_triple, "cuda", stack_small_models=s, **kw) for s in (False, True)]
    assert graphed[1].runner.graphs is not None and graphed[1].runner.streams.concurrent
    got = [generate(e, prompts(6, seed=24), SAMPLED) for e in graphed]
    assert sum(a == b for a, b in zip(*got)) >= 3  # the same noise: only bf16 near-ties may flip a token


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "olmo2", "olmo3", "gemma3", "gemma2", "qwen3_moe",
                                  "mixtral"])
def test_gpu_greedy_rast_equals_cpu_float32(arch: str, request: pytest.FixtureRequest) -> None:
    triple = request.getfixturevalue(f"{arch}_triple")
    cpu = make_engine(triple, "cpu", dtype="float32")
    gpu = make_engine(triple, "cuda", dtype="float32", attention_backend="triton")
    assert gpu.runner.graphs is not None and gpu.runner.streams.concurrent
    batch = prompts(6, seed=31)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    assert generate(gpu, batch, params) == generate(cpu, batch, params)


@pytest.mark.gpu
def test_gpu_weights_replaced_after_capture_equal_cpu_float32(qwen2_triple: tuple, tmp_path) -> None:  # noqa: ANN001
    """R's weights replaced in place (load_weights) after the graphs were captured and the engine served:
    greedy tokens equal the CPU float32 engine built on the new R."""
    from test_weight_updates import another_rl

    large, _, base = qwen2_triple
    rl2 = another_rl(qwen2_triple, "qwen2", tmp_path)
    gpu = make_engine(qwen2_triple, "cuda", dtype="float32", attention_backend="triton")
    assert gpu.runner.graphs is not None and gpu.runner.streams.concurrent
    batch = prompts(6, seed=33)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    before = generate(gpu, batch, params)
    gpu.load_weights(path=str(rl2))
    want = generate(make_engine((large, rl2, base), "cpu", dtype="float32"), batch, params)
    assert generate(gpu, batch, params) == want != before


@pytest.mark.gpu
@pytest.mark.parametrize("ahead", [False, True])
def test_async_output_equals_synchronous_on_gpu(qwen2_triple: tuple, ahead: bool) -> None:
    """Outputs read while the next batch runs (pinned copy + event), and with ``ahead`` each decode step
    launched before the previous step's ids are read (fed on the device, two steps in flight, double
    staging and pinned ids), equal the synchronous engine's; so do those of requests queued for two
    slots, admitted by prefills launched ahead with the running sequences' ids copied on the device, and
    requests of more samples than slots (a fork drawing more ids than the pinned rows hold; waiting
    samples admitted by prefills launched ahead)."""
    kw = dict(dtype="bfloat16", attention_backend="triton")
    sync_engine = make_engine(qwen2_triple, "cuda", async_output=False, **kw)
    async_engine = make_engine(qwen2_triple, "cuda", async_output=True, async_scheduling=ahead, **kw)
    batch = prompts(6, seed=51)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=5, stop_token_ids=[7, 11])
    want = generate(sync_engine, batch, params)
    assert generate(async_engine, batch, params) == want
    queued = make_engine(qwen2_triple, "cuda", async_output=True, async_scheduling=ahead, max_num_seqs=2, **kw)
    assert generate(queued, batch, params) == want
    wide = SamplingParams(n=5, temperature=1.0, max_tokens=8, seed=9, ignore_eos=True)
    assert generate(queued, batch[:3], wide, every=True) == generate(sync_engine, batch[:3], wide, every=True)
    with_logprobs = SamplingParams(temperature=0.8, max_tokens=8, seed=6, logprobs=3, ignore_eos=True)
    assert (generate(async_engine, batch, with_logprobs, logprobs=True)
            == generate(sync_engine, batch, with_logprobs, logprobs=True))  # computed on the device, read late
    assert async_engine._in_flight is None and async_engine.block_manager.num_used_blocks == 0


@pytest.mark.gpu
def test_adjusted_requests_on_gpu_equal_cpu_float32(qwen2_triple: tuple) -> None:
    """logit_bias, min_tokens, penalties, token masks and structured outputs (engine/logit_adjust.py,
    engine/structured.py): their steps replay the forward's graph and adjust and sample eagerly, beside
    plain steps replaying both stages, launched ahead but for structured outputs (penalties and bad words
    read the token on its way on the device); greedy tokens equal the CPU's."""
    cpu = make_engine(qwen2_triple, "cpu", dtype="float32")
    gpu = make_engine(qwen2_triple, "cuda", dtype="float32", attention_backend="triton", async_output=True,
                      async_scheduling=True)
    stages: list = []
    replay = gpu.runner.graphs.replay
    gpu.runner.graphs.replay = lambda rows, **kw: (stages.append(kw.get("stages")), replay(rows, **kw))[1]
    greedy = dict(temperature=0.0, max_tokens=12)
    batch = prompts(4, seed=61)
    for params in (SamplingParams(**greedy, logit_bias={7: 3.0, 11: -100.0}, min_tokens=6, stop_token_ids=[7]),
                   SamplingParams(**greedy, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.4,
                                  presence_penalty=0.2),
                   SamplingParams(**greedy, allowed_token_ids=list(range(3, 90)), bad_words=["the cat", "we"]),
                   *([SamplingParams(**greedy, structured_outputs={"regex": "(cat|dog)s? [0-9]{2}"})]
                     if importlib.util.find_spec("xgrammar") else [])):
        assert generate(gpu, batch, params) == generate(cpu, batch, params)
        assert generate(gpu, batch, GREEDY) == generate(cpu, batch, GREEDY)  # graphs again after them
    assert 1 in stages and None in stages  # adjusted steps replayed the forward alone, plain ones all
    assert gpu._in_flight is None and gpu.block_manager.num_used_blocks == 0


@pytest.mark.gpu
def test_prompt_logprobs_on_gpu_equal_cpu_float32(qwen2_triple: tuple) -> None:
    """prompt_logprobs (engine/prompt_logprobs.py) from CUDA prefills, chunked and launched ahead, equal
    the CPU's within float32 rounding."""
    params = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=2)
    batch = prompts(4, seed=71)
    got = []
    for engine in (make_engine(qwen2_triple, "cpu", dtype="float32"),
                   make_engine(qwen2_triple, "cuda", dtype="float32", attention_backend="triton", async_output=True,
                               async_scheduling=True, max_num_batched_tokens=8)):
        for i, p in enumerate(batch):
            engine.add_request(f"p{i}", p, params)
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.prompt_logprobs for o in engine.step() if o.finished})
        got.append([done[f"p{i}"] for i in range(len(batch))])
    for cpu, gpu in zip(*got):
        assert cpu[0] is None and gpu[0] is None and len(cpu) == len(gpu)
        for a, b in zip(cpu[1:], gpu[1:]):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-3 for t in a)


def _syncs_per_step(engine: LLMEngine, run: Callable[[], None]) -> list[tuple[int, int]]:
    """Per engine step: (syncs the sync debugger reports, CUDA event waits)."""
    counts: list[tuple[int, int]] = []
    step, event_sync = engine.step, torch.cuda.Event.synchronize
    waits = [0]

    def counting_wait(event: torch.cuda.Event) -> None:
        waits[0] += 1
        event_sync(event)

    def counting():  # noqa: ANN202
        waits[0] = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = step()
        counts.append((sum("synchroniz" in str(w.message) for w in caught), waits[0]))
        return out

    engine.step, torch.cuda.Event.synchronize = counting, counting_wait
    torch.cuda.set_sync_debug_mode("warn")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        engine.step, torch.cuda.Event.synchronize = step, event_sync
    return counts


@pytest.mark.gpu
@pytest.mark.parametrize("async_output", [False, True])
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_decode_step_reads_the_device_once(qwen2_triple: tuple, enforce_eager: bool, async_output: bool) -> None:
    """Every decode step, synchronous or not, reads its ids from pinned memory after one event wait, and
    nothing else syncs (the sync debugger does not count event waits in every torch version: at most
    that one)."""
    engine = make_engine(qwen2_triple, "cuda", dtype="bfloat16", attention_backend="triton",
                         enforce_eager=enforce_eager, async_output=async_output)
    batch = prompts(3, seed=41)
    generate(engine, batch, GREEDY)  # compiles the eager path's kernels (graphs were captured at start)
    counts = _syncs_per_step(engine, lambda: generate(engine, batch, GREEDY))
    assert len(counts) == GREEDY.max_tokens
    assert all(waits == 1 and syncs <= 1 for syncs, waits in counts[1:]), counts


ADJUSTED = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=8, ignore_eos=True, repetition_penalty=1.2,
                          presence_penalty=0.5, frequency_penalty=0.3, min_tokens=4,
                          allowed_token_ids=list(range(4, 90)))


@pytest.mark.gpu
def test_adjusted_and_forked_steps_add_no_host_sync(qwen2_triple: tuple) -> None:
    """Penalties, min_tokens' bans and allowed ids (applied eagerly) and n = 2 forks (copy-on-write of the
    prompt's last block) queue their small index tensors without a stream sync: a step syncs at most once."""
    engine = make_engine(qwen2_triple, "cuda", dtype="bfloat16", attention_backend="triton", async_output=True)
    batch = prompts(3, seed=43)
    generate(engine, batch, ADJUSTED)  # compiles the eager path's kernels
    counts = _syncs_per_step(engine, lambda: generate(engine, batch, ADJUSTED))
    assert all(syncs <= 1 for syncs, _ in counts[1:]), counts


@pytest.mark.gpu
def test_dummy_bf16_engine_with_graphs_and_streams(tmp_path) -> None:  # noqa: ANN001
    """The benchmark's configuration: dummy weights, token-id prompts, batches across several buckets."""
    import json

    cfg = dict(model_type="qwen2", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    d = str(tmp_path)
    engine = LLMEngine(EngineConfig(model=d, small_rl=d, small_base=d, load_format="dummy", dtype="bfloat16",
                                    max_num_seqs=20, max_model_len=128, kv_cache_memory=64 << 20))
    assert engine.tokenizer is None and engine.runner.graphs is not None
    params = SamplingParams(ignore_eos=True, max_tokens=12, seed=5)
    for n in (1, 5, 16, 20):
        first = generate(engine, prompts(n, seed=n), params)
        assert [len(o) for o in first] == [12] * n
        assert generate(engine, prompts(n, seed=n), params) == first  # seeded: replays reproduce
    assert set(engine.runner.graphs.graphs) == set(batch_buckets(20))
