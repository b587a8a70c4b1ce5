"""A request of n samples takes one slot to prefill; the samples forked beyond the free slots park (their
first token drawn, the prompt's blocks shared) and take slots as they free (scheduler.py). The oracle is
the same request run alone on an engine with room for every sample: seeded draws depend only on the
sample, never on the batch, so a parked sample's tokens must equal it."""
from __future__ import annotations

import pytest

from rast_engine import SamplingParams
from rast_engine.block_manager import BlockManager
from rast_engine.llm_engine import LLMEngine
from rast_engine.scheduler import Scheduler
from rast_engine.sequence import Sequence, SequenceStatus
from test_engine_lifecycle import TEXTS, alone, assert_clean, encode, make_engine, run
from test_scheduler import make_seq


@pytest.fixture(scope="module")
def roomy(qwen2_triple: tuple) -> LLMEngine:
    return make_engine(qwen2_triple, blocks=256, caching=False, max_num_seqs=16)


def watch_slots(engine: LLMEngine) -> list[tuple[int, int, int]]:
    """(running, parked, sequences joining with no pending token) after every schedule() and
    schedule_ahead() (the last is 0 for schedule(), where no sequence has one)."""
    seen: list[tuple[int, int, int]] = []
    sched = engine.scheduler
    for name in ("schedule", "schedule_ahead"):
        inner = getattr(sched, name)

        def watched(inner=inner, ahead=name == "schedule_ahead"):  # noqa: ANN202
            out = inner()
            joined = sum(not s.num_pending for s in out.seqs) if ahead and out is not None else 0
            seen.append((len(sched.running), len(sched.parked), joined))
            return out

        setattr(sched, name, watched)
    return seen


@pytest.mark.parametrize("ahead", [False, True])
def test_samples_beyond_the_free_slots_park_and_equal_a_roomy_run(qwen2_triple: tuple, roomy: LLMEngine,
                                                                   ahead: bool) -> None:
    """Two slots, requests of 5, 1 and 3 samples (n above max_num_seqs is accepted): every sample equals
    its run alone, never more than two run, and no slot idles while a sample is parked."""
    engine = make_engine(qwen2_triple, blocks=64, max_num_seqs=2, async_output=ahead)
    assert engine.async_scheduling is ahead
    seen = watch_slots(engine)
    ids = [encode(engine, t) for t in TEXTS[:3]]
    requests = {
        "wide": (ids[0], SamplingParams(n=5, temperature=1.0, top_k=40, max_tokens=8, seed=3, ignore_eos=True)),
        "one": (ids[1], SamplingParams(temperature=1.0, max_tokens=6, seed=4, ignore_eos=True)),
        "three": (ids[2], SamplingParams(n=3, temperature=0.9, max_tokens=7, seed=5, stop_token_ids=[11, 17])),
    }
    got = run(engine, requests)
    for rid, (prompt, params) in requests.items():
        assert got[rid] == alone(roomy, prompt, params), rid
    assert max(running for running, _, _ in seen) == 2
    assert any(parked >= 3 for _, parked, _ in seen), "the wide request never parked its samples"
    assert all(running == 2 for running, parked, _ in seen if parked), "a slot idled while a sample was parked"
    if ahead:  # samples unparked into steps launched ahead, their input ids known (fed nothing)
        assert sum(joined for _, _, joined in seen) >= 3
    assert_clean(engine)


def test_a_parked_sample_can_finish_on_its_first_token(qwen2_triple: tuple, roomy: LLMEngine) -> None:
    engine = make_engine(qwen2_triple, blocks=32, max_num_seqs=2)
    ids = encode(engine, TEXTS[1])
    params = SamplingParams(n=6, temperature=1.0, max_tokens=1, seed=8)
    got = run(engine, {"r": (ids, params)})["r"]
    assert len(got) == 6 and all(len(tokens) == 1 for tokens, _, _ in got)
    assert got == alone(roomy, ids, params)
    assert_clean(engine)


def test_abort_with_parked_samples_frees_everything(qwen2_triple: tuple, roomy: LLMEngine) -> None:
    engine = make_engine(qwen2_triple, blocks=32, max_num_seqs=2)
    ids = encode(engine, TEXTS[0])
    engine.add_request("wide", ids, SamplingParams(n=7, temperature=1.0, max_tokens=20, seed=2, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert len(engine.scheduler.parked) == 5 and engine.stats().num_waiting == 5
    engine.abort_request("wide")
    assert_clean(engine)
    probe = SamplingParams(n=3, temperature=1.0, max_tokens=5, seed=1, ignore_eos=True)
    assert run(engine, {"probe": (ids, probe)})["probe"] == alone(roomy, ids, probe)
    assert_clean(engine)


def test_parked_samples_go_before_waiting_requests() -> None:
    """Admission counts parked samples as taken slots, so a request queued behind a fork waits for them."""
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64,
                      eos_token_ids=[])
    parent = make_seq([1, 3, 4], SamplingParams(n=4, max_tokens=5), rid="wide")
    parent.group.forked = False
    sched.add(parent)
    assert sched.schedule().seqs == [parent]
    parent.num_computed_tokens = 3
    children = [Sequence(group=parent.group, index=j, token_ids=[1, 3, 4], seed=j) for j in range(1, 4)]
    for j, seq in enumerate([parent] + children):
        if seq is not parent:
            sched.bm.fork(parent, seq)
            sched.add_sample(seq)
        seq.token_ids.append(20 + j)
    assert [s.status for s in children] == [SequenceStatus.RUNNING, SequenceStatus.PARKED, SequenceStatus.PARKED]
    late = make_seq([5, 5, 5], rid="late")
    sched.add(late)
    out = sched.schedule()
    assert not out.is_prefill and out.seqs == [parent, children[0]] and list(sched.waiting) == [late]
    sched.finish(children[0], "stop")
    out = sched.schedule()  # the freed slot goes to the next parked sample, not to the waiting request
    assert out.seqs == [parent, children[1]] and list(sched.parked) == [children[2]]


def test_a_parked_sample_waits_for_blocks_instead_of_forcing_a_preemption() -> None:
    """Unparking needs the free blocks for its first slot beside every running sequence's next one: here
    the one free block goes to the parent's copy-on-write of the shared prompt block, so the sample
    stays parked (unparked, the decode step would preempt it at once)."""
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                      eos_token_ids=[])
    parent = make_seq([1, 3, 4], SamplingParams(n=2, max_tokens=5), rid="wide")
    parent.group.forked = False
    other = make_seq([7] * 6, rid="other")
    for seq in (parent, other):
        sched.add(seq)
    assert sched.schedule().seqs == [parent, other] and sched.bm.num_free_blocks == 1
    parent.num_computed_tokens, other.num_computed_tokens = 3, 6
    child = Sequence(group=parent.group, index=1, token_ids=[1, 3, 4], seed=1)
    sched.bm.fork(parent, child)
    sched.parked.append(child)  # as add_sample parks it when the slots are full
    child.status = SequenceStatus.PARKED
    for seq, token in ((parent, 9), (child, 10), (other, 11)):
        seq.token_ids.append(token)
    out = sched.schedule()
    assert out.seqs == [parent, other] and len(out.copies) == 1
    assert list(sched.parked) == [child] and sched.num_preemptions == 0
