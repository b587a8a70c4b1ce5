"""async_output: a step takes the tokens of the batch in flight, launches the next batch, and only then
detokenises, checks stop strings and builds outputs. The oracle is the synchronous engine (equal to HF
transformers by test_engine.py): seeded sampling gives the same tokens whatever the batch, so any token
lost, duplicated or kept past a stop shows. Each test also checks that the engine ends clean."""
from __future__ import annotations

import pytest

from rast_engine import SamplingParams
from rast_engine.detokenizer import IncrementalDetokenizer
from rast_engine.sequence import SequenceStatus
from test_engine_lifecycle import TEXTS, alone, assert_clean, drain, encode, fail, make_engine, run


@pytest.fixture(scope="module")
def oracle(qwen2_triple: tuple):  # noqa: ANN201
    return make_engine(qwen2_triple, blocks=256, caching=False, async_output=False)


def test_overlap_order_launches_before_detokenising(qwen2_triple: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next batch is launched before the previous batch's text is read (the overlap itself)."""
    engine = make_engine(qwen2_triple, async_output=True)
    log: list[str] = []
    launch, detok = engine.runner.launch, IncrementalDetokenizer.step
    monkeypatch.setattr(engine.runner, "launch", lambda *a: (log.append("launch"), launch(*a))[1])
    monkeypatch.setattr(IncrementalDetokenizer, "step", lambda self, *a: (log.append("text"), detok(self, *a))[1])
    engine.add_request("a", encode(engine, TEXTS[0]), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    drain(engine)
    # prefill launched; then per step: next launch, then the text of the batch just taken
    assert log[:5] == ["launch", "launch", "text", "launch", "text"], log
    assert log.count("text") == 4 and engine._in_flight is None
    assert_clean(engine)


def test_stop_strings_and_eos_match_the_synchronous_engine(qwen2_triple: tuple, oracle) -> None:  # noqa: ANN001
    engine = make_engine(qwen2_triple, async_output=True)
    ids = [encode(engine, t) for t in TEXTS]
    free_text = alone(oracle, ids[0], SamplingParams(temperature=1.0, max_tokens=16, seed=5, ignore_eos=True))
    words = free_text[0][1].split()
    assert words, "the oracle produced no text to stop on"
    stop = words[min(2, len(words) - 1)]
    requests = {
        "stop": (ids[0], SamplingParams(temperature=1.0, max_tokens=16, seed=5, ignore_eos=True, stop=[stop])),
        "fork": (ids[1], SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=6, stop=[" the", "."])),
        "eos": (ids[2], SamplingParams(temperature=1.2, max_tokens=20, seed=7)),
        "short": (ids[3], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)),
    }
    got = run(engine, requests)
    assert got["stop"][0][2] == "stop" and stop not in got["stop"][0][1]
    for rid, (prompt, params) in requests.items():
        assert got[rid] == alone(oracle, prompt, params), rid
    assert_clean(engine)


def test_preemption_with_forks_and_prefix_cache(qwen2_triple: tuple, oracle) -> None:  # noqa: ANN001
    tight = make_engine(qwen2_triple, blocks=12, async_output=True)
    prompts = [encode(tight, t) for t in TEXTS[:3]]
    requests = {
        "greedy": (prompts[0], SamplingParams(n=2, temperature=0.0, max_tokens=14, ignore_eos=True, stop=["zz"])),
        "seeded": (prompts[1], SamplingParams(n=3, temperature=1.0, top_k=30, max_tokens=12, seed=9, stop=[" a"])),
        "single": (prompts[2], SamplingParams(temperature=0.8, max_tokens=10, seed=4, ignore_eos=True)),
    }
    got = run(tight, requests)
    assert tight.scheduler.num_preemptions > 0
    for rid, (ids, params) in requests.items():
        assert got[rid] == alone(oracle, ids, params), rid
    assert_clean(tight)


def test_abort_while_a_batch_is_in_flight(qwen2_triple: tuple, oracle) -> None:  # noqa: ANN001
    engine = make_engine(qwen2_triple, async_output=True)
    ids = encode(engine, TEXTS[0])
    probe = SamplingParams(temperature=1.0, max_tokens=6, seed=2, ignore_eos=True)
    engine.add_request("x", ids, SamplingParams(n=2, temperature=1.0, max_tokens=30, seed=1, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine._in_flight is not None  # the next batch runs while the caller holds the outputs
    engine.abort_request("x")
    assert run(engine, {"probe": (ids, probe)})["probe"] == alone(oracle, ids, probe)
    assert_clean(engine)


def test_a_failed_launch_keeps_the_taken_tokens(qwen2_triple: tuple, oracle, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001,E501
    """The step that fails to launch the next batch still took its own tokens; stepping on gives the
    run that never failed."""
    engine = make_engine(qwen2_triple, async_output=True)
    ids = encode(engine, TEXTS[1])
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=3, ignore_eos=True, stop=["@@"])
    engine.add_request("r", ids, params)
    engine.step()
    engine.step()
    fail(monkeypatch, engine.runner, "forward_logits")
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    monkeypatch.undo()
    seq = engine.groups["r"].seqs[0]
    assert seq.status is SequenceStatus.WAITING and engine._in_flight is None  # requeued for recompute
    assert drain(engine)["r"] == alone(oracle, ids, params)
    assert_clean(engine)
