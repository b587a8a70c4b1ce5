"""async_scheduling when things fail: a step ahead that fails or finds no admissible token is undone
with the step before it, an abort with two batches in flight, and the configuration check. The oracle is
the synchronous engine, as in test_async_scheduling.py; each test also checks the engine ends clean."""
from __future__ import annotations

import pytest
import torch

import rast_kernels
from rast_engine import SamplingParams
from rast_engine.errors import RastError
from rast_engine.llm_engine import LLMEngine
from rast_engine.pending import PendingStep
from rast_engine.sequence import PENDING, SequenceStatus
from test_async_scheduling import ahead_engine, count_ahead
from test_engine_lifecycle import TEXTS, alone, assert_clean, drain, encode, fail, make_engine, run, summary


@pytest.fixture(scope="module")
def oracle(qwen2_triple: tuple) -> LLMEngine:
    return make_engine(qwen2_triple, blocks=256, caching=False, async_output=False)


def test_a_block_the_failed_step_ahead_never_wrote_is_never_reused(qwen2_triple: tuple, oracle: LLMEngine,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The step ahead that completes a block fails without writing its K/V: the commit before it must not
    have put that block in the prefix cache, or a prompt extending the sequence would read it."""
    engine = ahead_engine(qwen2_triple)
    bs = engine.config.block_size
    engine.add_request("r", encode(engine, TEXTS[0]), SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    engine.step()
    engine.step()
    seq = engine.groups["r"].seqs[0]
    while len(seq.token_ids) % bs:  # the next step ahead's input token is the last of a block
        engine.step()
    last = len(seq.token_ids) - 1
    monkeypatch.setattr(engine.runner, "launch", lambda *a: PendingStep(ids=torch.tensor([-1])))  # writes nothing
    engine.step()
    monkeypatch.undo()
    assert seq.token_ids[last] != PENDING and seq.num_computed_tokens == last + 1  # counted, id known
    assert seq.block_table[last // bs] not in engine.block_manager.hash_of  # but not hashed
    with pytest.raises(RuntimeError, match="admissible"):
        engine.step()
    known = list(seq.token_ids)
    engine.abort_request("r")
    probe, params = known + [7], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    assert run(engine, {"p": (probe, params)})["p"] == alone(oracle, probe, params)
    assert_clean(engine)


def test_an_undrawable_token_is_never_fed_to_the_step_ahead(qwen2_triple: tuple, oracle: LLMEngine,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A row with no admissible token samples -1, and the step launched ahead reads its input from the
    device before the host sees it. On CUDA an embedding lookup of -1 is a device-side assert that kills
    the process, so the feed must hold a valid id: the step ahead launches (on the CPU a -1 would raise
    there), wait() raises the sampler's error, both steps are undone, and stepping on recovers."""
    engine = ahead_engine(qwen2_triple)
    real, draws = rast_kernels.rast_sample, []

    def undrawable_third(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        ids = real(*args, **kwargs)
        draws.append(len(draws))
        return torch.full_like(ids, -1) if len(draws) == 3 else ids

    launched: list = []
    launch_ahead = engine._launch_ahead

    def recorded(batch):  # noqa: ANN001, ANN202
        try:
            launched.append(launch_ahead(batch))
        except BaseException as e:
            launched.append(e)
            raise
        return launched[-1]

    monkeypatch.setattr(rast_kernels, "rast_sample", undrawable_third)
    monkeypatch.setattr(engine, "_launch_ahead", recorded)
    ids = encode(engine, TEXTS[0])
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=4, ignore_eos=True)
    engine.add_request("r", ids, params)
    with pytest.raises(RuntimeError, match="admissible"):
        for _ in range(8):
            engine.step()
    assert len(draws) == 4 and launched and not any(isinstance(x, BaseException) for x in launched)
    monkeypatch.undo()
    assert drain(engine)["r"] == alone(oracle, ids, params)
    assert_clean(engine)


def test_abort_with_two_batches_in_flight(qwen2_triple: tuple, oracle: LLMEngine) -> None:
    engine = ahead_engine(qwen2_triple)
    ids = encode(engine, TEXTS[0])
    probe = SamplingParams(temperature=1.0, max_tokens=6, seed=2, ignore_eos=True)
    engine.add_request("x", ids, SamplingParams(n=2, temperature=1.0, max_tokens=30, seed=1, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine._in_flight.holds_pending
    engine.abort_request("x")
    assert run(engine, {"probe": (ids, probe)})["probe"] == alone(oracle, ids, probe)
    assert_clean(engine)


def test_an_aborted_request_gets_no_kept_output(qwen2_triple: tuple, oracle: LLMEngine,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A step whose next launch failed keeps its outputs for the next step; an abort drops the aborted
    request's, so the id re-added gets its own outputs only. abort_request takes several ids too."""
    engine = ahead_engine(qwen2_triple)
    old, new = encode(engine, TEXTS[0]), encode(engine, TEXTS[1])
    engine.add_request("x", old, SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=1, ignore_eos=True))
    real, calls = engine.runner.launch, []

    def launch(*args: object, **kwargs: object) -> object:  # the launch after x's first draw fails once
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)
    monkeypatch.setattr(engine.runner, "launch", launch)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    engine.abort_request("x")
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    engine.add_request("x", new, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert all(o.prompt_token_ids == new for o in outs), "the aborted request's kept output came back"
    assert summary(outs[-1]) == alone(oracle, new, params)
    for rid in ("a", "b", "c"):
        engine.add_request(rid, old, params)
    engine.abort_request(["a", "b"])
    engine.abort_request(("c",))
    assert_clean(engine)
    with pytest.raises(RastError, match="request id"):
        engine.abort_request(None)  # type: ignore[arg-type]
    with pytest.raises(RastError, match="request id"):
        engine.abort_request(["a", 3])  # type: ignore[list-item]


@pytest.mark.parametrize("where", ["ahead launch", "wait", "wait, an admission ahead"])
def test_a_failing_step_is_undone_with_the_step_ahead(qwen2_triple: tuple, oracle: LLMEngine,
                                                      monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """The launch of the step ahead fails, or the wait for the batch in flight does (with a decode step
    ahead, or a prefill ahead admitting a request): every sequence of both is requeued with its known
    tokens only, the admitted request behind them, and stepping on gives the run that never failed."""
    engine = ahead_engine(qwen2_triple)
    ids = encode(engine, TEXTS[1])
    params = SamplingParams(n=2, temperature=1.0, max_tokens=9, seed=3, ignore_eos=True, stop=["@@"])
    late = (encode(engine, TEXTS[3]), SamplingParams(temperature=0.7, max_tokens=5, seed=8, ignore_eos=True))
    engine.add_request("r", ids, params)
    for _ in range(3):
        engine.step()
    assert engine._in_flight.holds_pending
    if where.startswith("wait"):
        fail(monkeypatch, engine._in_flight.step, "wait")
    else:
        fail(monkeypatch, engine.runner, "forward_logits")
    prefills = count_ahead(engine, prefills=True)
    if where.endswith("ahead"):
        engine.add_request("late", *late)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    assert prefills == ([3] if where.endswith("ahead") else [])  # "late" admitted, r's two samples riding
    monkeypatch.undo()
    seqs = [s for g in engine.groups.values() for s in g.seqs]
    assert all(s.status is SequenceStatus.WAITING and not s.num_pending and PENDING not in s.token_ids
               for s in seqs)
    assert list(engine.scheduler.waiting) == seqs and engine._in_flight is None
    done = drain(engine)
    assert done["r"] == alone(oracle, ids, params)
    if where.endswith("ahead"):
        assert done["late"] == alone(oracle, *late)
    assert_clean(engine)


def test_async_scheduling_needs_async_output(qwen2_triple: tuple) -> None:
    with pytest.raises(RastError, match="async_output"):
        make_engine(qwen2_triple, async_output=False, async_scheduling=True)
    with pytest.raises(RastError, match="async_output"):  # off by default on the CPU
        make_engine(qwen2_triple, async_scheduling=True)
    assert not make_engine(qwen2_triple, async_output=True, async_scheduling=False).async_scheduling
