"""A request of n samples takes one slot to prefill; at its first draw the samples that find no free slot
wait at the front of the queue, holding their first token and no block, and are admitted like preempted
sequences (scheduler.py). The oracle is the same request run alone on an engine with room for every
sample: seeded draws depend only on the sample, never on the batch, so a sample that waited must give
the same tokens."""
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


def waiting_samples(engine: LLMEngine) -> int:
    return sum(s.group.forked for s in engine.scheduler.waiting)


def watch_slots(engine: LLMEngine) -> list[tuple[int, int, int]]:
    """(running, samples waiting, samples admitted by a step launched ahead) after every schedule() and
    schedule_ahead()."""
    seen: list[tuple[int, int, int]] = []
    sched = engine.scheduler
    for name in ("schedule", "schedule_ahead"):
        inner = getattr(sched, name)

        def watched(inner=inner, ahead=name == "schedule_ahead"):  # noqa: ANN202
            out = inner()
            joined = sum(s.group.forked and not s.num_pending for s in out.seqs) if ahead and out else 0
            seen.append((len(sched.running), waiting_samples(engine), joined))
            return out

        setattr(sched, name, watched)
    return seen


@pytest.mark.parametrize("ahead", [False, True])
def test_samples_beyond_the_free_slots_wait_and_equal_a_roomy_run(qwen2_triple: tuple, roomy: LLMEngine,
                                                                   ahead: bool) -> None:
    """Two slots, requests of 5, 1 and 3 samples (n above max_num_seqs is accepted): every sample equals
    its run alone, never more than two run, and no slot idles while a sample waits."""
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
    assert any(waiting >= 3 for _, waiting, _ in seen), "the wide request's samples never waited"
    assert all(running == 2 for running, waiting, _ in seen if waiting), "a slot idled while a sample waited"
    if ahead:  # waiting samples admitted by prefills launched ahead, their ids all known
        assert sum(joined for _, _, joined in seen) >= 3
    assert engine.block_manager.prefix_hits > 0  # a waiting sample recomputes only past the prompt's full blocks
    assert_clean(engine)


@pytest.mark.parametrize("ahead", [False, True])
def test_samples_holding_no_blocks_cannot_deadlock_the_cache(qwen2_triple: tuple, roomy: LLMEngine,
                                                             ahead: bool) -> None:
    """Two requests of two samples whose prompts fill the cache: the samples that find no slot hold no
    block, so the running ones take their next slots by preempting each other, as any sequences do
    (found by a randomized search while waiting samples still held the prompt's blocks: the engine
    stopped with 'cannot make progress')."""
    engine = make_engine(qwen2_triple, blocks=10, caching=False, max_num_seqs=2, max_model_len=24,
                         async_output=ahead)
    params = SamplingParams(n=2, temperature=0.0, max_tokens=2, ignore_eos=True)
    requests = {"a": (list(range(5, 25)), params), "b": (list(range(30, 50)), params)}
    got = run(engine, requests)
    for rid, (prompt, p) in requests.items():
        assert got[rid] == alone(roomy, prompt, p), rid
    assert_clean(engine)


def test_a_waiting_sample_can_finish_on_its_first_token(qwen2_triple: tuple, roomy: LLMEngine) -> None:
    engine = make_engine(qwen2_triple, blocks=32, max_num_seqs=2)
    ids = encode(engine, TEXTS[1])
    params = SamplingParams(n=6, temperature=1.0, max_tokens=1, seed=8)
    got = run(engine, {"r": (ids, params)})["r"]
    assert len(got) == 6 and all(len(tokens) == 1 for tokens, _, _ in got)
    assert got == alone(roomy, ids, params)
    assert_clean(engine)


def test_abort_with_waiting_samples_frees_everything(qwen2_triple: tuple, roomy: LLMEngine) -> None:
    engine = make_engine(qwen2_triple, blocks=32, max_num_seqs=2)
    ids = encode(engine, TEXTS[0])
    engine.add_request("wide", ids, SamplingParams(n=7, temperature=1.0, max_tokens=20, seed=2, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert waiting_samples(engine) == 5 and engine.stats().num_waiting == 5
    engine.abort_request("wide")
    assert_clean(engine)
    probe = SamplingParams(n=3, temperature=1.0, max_tokens=5, seed=1, ignore_eos=True)
    assert run(engine, {"probe": (ids, probe)})["probe"] == alone(roomy, ids, probe)
    assert_clean(engine)


def test_samples_without_a_slot_go_before_waiting_requests() -> None:
    """The samples that find a slot share the parent's blocks; the others wait, in order, ahead of the
    requests queued behind their request, and take slots as they free."""
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64,
                      eos_token_ids=[])
    parent = make_seq([1, 3, 4], SamplingParams(n=4, max_tokens=5), rid="wide")
    parent.group.forked = False
    late = make_seq([5, 5, 5], rid="late")
    sched.add(parent)
    assert sched.schedule().seqs == [parent]
    sched.add(late)
    parent.num_computed_tokens = 3
    children = [Sequence(group=parent.group, index=j, token_ids=[1, 3, 4], seed=j) for j in range(1, 4)]
    sched.add_samples(parent, children)
    for j, seq in enumerate([parent] + children):
        seq.token_ids.append(20 + j)
    assert [s.status for s in children] == [SequenceStatus.RUNNING] + [SequenceStatus.WAITING] * 2
    assert children[0].block_table == parent.block_table and not children[1].block_table
    assert list(sched.waiting) == [children[1], children[2], late]
    out = sched.schedule()
    assert not out.is_prefill and out.seqs == [parent, children[0]] and len(out.copies) == 1
    sched.finish(children[0], "stop")
    out = sched.schedule()  # the freed slot goes to the next sample: its prompt and first token prefilled
    assert out.is_prefill and out.seqs == [parent, children[1]] and children[1].num_scheduled_tokens == 4
    assert list(sched.waiting) == [children[2], late]


def test_a_wide_request_draws_from_one_row_without_a_copy_per_sample(qwen2_triple: tuple, roomy: LLMEngine,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """n = 40 first draws read the parent's row through a stride-0 view and their logprobs come from one
    rast_probs row, so a step's memory does not grow with n; tokens and logprobs equal the roomy run."""
    from rast_engine import draws

    calls: list[tuple[str, int, int]] = []
    for name in ("rast_sample", "rast_probs"):
        inner = getattr(draws.rast_kernels, name)

        def recorded(logits, *args, _inner=inner, _name=name, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            calls.append((_name, logits.shape[0], logits.stride(0)))
            return _inner(logits, *args, **kwargs)

        monkeypatch.setattr(draws.rast_kernels, name, recorded)
    params = SamplingParams(n=40, temperature=1.0, max_tokens=3, seed=12, logprobs=2, ignore_eos=True)
    ids = encode(roomy, TEXTS[2])

    def outputs(engine: LLMEngine) -> list:
        engine.add_request("w", ids, params)
        final = None
        while engine.has_unfinished_requests():
            final = next((o for o in engine.step() if o.finished), final)
        return [(c.token_ids, c.logprobs) for c in final.outputs]

    got = outputs(make_engine(qwen2_triple, blocks=64, max_num_seqs=2))
    assert ("rast_sample", 40, 0) in calls
    assert all(rows <= 2 for name, rows, _ in calls if name == "rast_probs")
    want = outputs(roomy)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in want]
    for (_, lp_got), (_, lp_want) in zip(got, want):
        for g, w in zip(lp_got, lp_want):
            assert g.keys() == w.keys() and all(abs(g[t] - w[t]) < 1e-5 for t in g)


def test_waiting_samples_count_only_their_uncached_tokens_against_the_budget() -> None:
    """A waiting sample whose prompt blocks are cached recomputes one token: two are admitted by one step of
    an 8-token budget (budgeted at their full 13 tokens, one a step)."""
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=8, max_model_len=64,
                      eos_token_ids=[])
    prompt = list(range(20, 32))
    parent = make_seq(prompt, SamplingParams(n=4, max_tokens=5), rid="wide")
    parent.group.forked = False
    sched.add(parent)
    for _ in range(2):  # the 12-token prompt in chunks of 8 and 4
        for seq in sched.schedule().seqs:
            seq.num_computed_tokens += seq.num_scheduled_tokens
            sched.bm.register_computed(seq)
    children = [Sequence(group=parent.group, index=j, token_ids=list(prompt), seed=j) for j in range(1, 4)]
    sched.add_samples(parent, children)
    for j, seq in enumerate([parent] + children):
        seq.token_ids.append(40 + j)
    sched.finish(parent, "stop")
    sched.finish(children[0], "stop")
    assert sched.bm.uncached_tokens(children[1]) == 1
    out = sched.schedule()
    assert out.is_prefill and out.seqs == children[1:] and [s.num_scheduled_tokens for s in out.seqs] == [1, 1]


def test_samples_of_two_forks_in_one_step_wait_in_fork_order() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64,
                      eos_token_ids=[])
    parents = [make_seq([1 + i, 3, 4], SamplingParams(n=3, max_tokens=5), rid=f"r{i}") for i in range(2)]
    late = make_seq([5, 5, 5], rid="late")
    for p in parents:
        p.group.forked = False
        sched.add(p)
    assert sched.schedule().seqs == parents
    sched.add(late)
    queued = 0
    forks = []
    for p in parents:
        p.num_computed_tokens = 3
        children = [Sequence(group=p.group, index=j, token_ids=list(p.token_ids), seed=j) for j in (1, 2)]
        queued += sched.add_samples(p, children, queued)
        forks += children
    assert queued == 4 and list(sched.waiting) == forks + [late]


def test_samples_that_end_at_once_leave_the_next_forks_samples_in_front(qwen2_triple: tuple) -> None:
    """A fork whose queued samples all end by their first token (max_tokens=1) leaves the queue at once;
    the next fork of the same step still queues its samples ahead of the requests already waiting."""
    engine = make_engine(qwen2_triple, blocks=64, max_num_seqs=2, async_output=False)
    ids = [encode(engine, t) for t in TEXTS[:3]]
    sampled = dict(temperature=1.0, ignore_eos=True)
    engine.add_request("short", ids[0], SamplingParams(n=3, seed=1, max_tokens=1, **sampled))
    engine.add_request("long", ids[1], SamplingParams(n=3, seed=2, max_tokens=4, **sampled))
    engine.add_request("late", ids[2], SamplingParams(seed=3, max_tokens=4, **sampled))
    engine.step()  # prefills "short" and "long" in the two slots and forks both
    assert [(s.group.request_id, s.index) for s in engine.scheduler.waiting] == [("long", 2), ("late", 0)]
    run(engine, {})
    assert_clean(engine)
