"""vLLM's priority scheduling (scheduling_policy="priority"): the queue is admitted in (priority, arrival)
order, the running sequence last in that order is preempted first, and a priority under FCFS is refused.

Oracles: the order vLLM's policy defines (sorted by (priority, arrival)), the scheduler tests' stand-in
sampler (a lost or altered token shows), and the engine's own outputs of each request run alone."""
from __future__ import annotations

import pytest
from test_scheduler import BS, EOS, expected, make_seq, run_step

from rast_engine import SamplingParams
from rast_engine.block_manager import BlockManager
from rast_engine.errors import RastError
from rast_engine.scheduler import Scheduler


def _scheduler(num_blocks: int, max_num_seqs: int, policy: str) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS), max_num_seqs=max_num_seqs, max_num_batched_tokens=64,
                     max_model_len=64, eos_token_ids=[EOS], policy=policy)


def _seq(i: int, priority: int, max_tokens: int = 4) -> object:
    seq = make_seq([3 + i] * 4, SamplingParams(max_tokens=max_tokens), rid=f"r{i}")
    seq.group.arrival, seq.group.priority = i, priority
    return seq


def _admissions(sched: Scheduler, seqs: list) -> list[str]:
    """The order in which ``seqs`` (added in their order) are first scheduled."""
    for s in seqs:
        sched.add(s)
    log: list = []
    while sched.has_unfinished():
        run_step(sched, log)
    order: list[str] = []
    for _, ids in log:
        order += [r for r in ids if r not in order]
    assert all(s.token_ids == expected(s.group.prompt_token_ids, 4) for s in seqs)
    return order


@pytest.mark.parametrize("priorities", [[5, 0, 1, 0, -2], [0, 0, 0, 0, 0], [3, 2, 1, 0, -1]])
def test_the_queue_is_admitted_by_priority_then_arrival(priorities: list[int]) -> None:
    seqs = [_seq(i, p) for i, p in enumerate(priorities)]
    order = _admissions(_scheduler(64, 1, "priority"), seqs)
    assert order == [f"r{i}" for i in sorted(range(5), key=lambda i: (priorities[i], i))]
    assert _admissions(_scheduler(64, 1, "fcfs"), [_seq(i, 0) for i in range(5)]) == [f"r{i}" for i in range(5)]


def test_the_lowest_priority_running_sequence_is_preempted_first() -> None:
    """Three sequences of 4-token prompts growing to 12 tokens, blocks for 7 of 4 tokens: decodes must
    preempt. The victim is the running sequence last in (priority, arrival) order, never the most urgent;
    every sequence still gets its own tokens."""
    sched = _scheduler(7, 3, "priority")
    seqs = [_seq(0, 2, 8), _seq(1, 0, 8), _seq(2, 1, 8)]
    preempted: list[str] = []
    inner = sched._preempt

    def record(seq: object) -> None:
        preempted.append(seq.group.request_id)  # type: ignore[attr-defined]
        inner(seq)

    sched._preempt = record  # type: ignore[method-assign]
    for s in seqs:
        sched.add(s)
    log: list = []
    while sched.has_unfinished():
        run_step(sched, log)
    assert preempted and "r1" not in preempted and preempted[0] == "r0"
    assert all(s.token_ids == expected(s.group.prompt_token_ids, 8) for s in seqs)


def test_the_engine_honours_priority_and_refuses_it_under_fcfs(qwen2_triple: tuple) -> None:
    from rast_engine import LLM

    large, rl, base = map(str, qwen2_triple)
    kw = dict(lam=0.7, device="cpu", dtype="float32", kv_cache_blocks=64, block_size=4, max_num_seqs=1)
    llm = LLM(large, rl, base, scheduling_policy="priority", **kw)
    prompts = [[5, 9, 9, 17], [7, 30, 4], [9, 9, 30, 4, 4], [12, 13]]
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=5)
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    engine = llm.llm_engine
    for i, (p, rank) in enumerate(zip(prompts, [3, -1, 3, 0])):
        engine.add_request(f"q{i}", p, params, priority=rank)
    finished: list[str] = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["q1", "q3", "q0", "q2"]  # one slot: served in (priority, arrival) order
    outs = llm.generate(prompts, params, use_tqdm=False, priority=[1, 1, 0, 2])
    assert [o.outputs[0].token_ids for o in outs] == alone
    with pytest.raises(RastError, match="2 priorities for 4 prompts"):
        llm.generate(prompts, params, use_tqdm=False, priority=[0, 1])
    fcfs = LLM(large, rl, base, **kw)
    with pytest.raises(RastError, match="needs scheduling_policy='priority'"):
        fcfs.generate(prompts[:1], params, use_tqdm=False, priority=[1])
    with pytest.raises(RastError, match="priority must be an integer"):
        llm.llm_engine.add_request("x", prompts[0], params, priority=1.5)  # type: ignore[arg-type]
    assert not fcfs.llm_engine.has_unfinished_requests() and not llm.llm_engine.has_unfinished_requests()
    with pytest.raises(RastError, match="scheduling_policy must be one of"):
        LLM(large, rl, base, scheduling_policy="lifo", **kw)


def test_the_server_takes_vllms_priority_field(srv, server_triple: tuple) -> None:  # noqa: ANN001
    import httpx
    from server_util import MODEL, Running, server_engine

    from rast_engine.server.app import OpenAIServer

    body = {"model": MODEL, "prompt": "the cat", "max_tokens": 2, "priority": 1}
    r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)  # the default fcfs server
    assert (r.status_code, r.json()["error"]["param"]) == (400, "priority"), r.text
    assert httpx.post(f"{srv.url}/v1/completions", json={**body, "priority": 0}, timeout=60).status_code == 200
    running = Running(OpenAIServer(server_engine(server_triple, scheduling_policy="priority"), model_name=MODEL))
    try:
        seen: list[int] = []
        add = running.server.engine.engine.add_request
        running.server.engine.engine.add_request = lambda *a, **kw: (seen.append(kw["priority"]), add(*a, **kw))[1]
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "priority": -3}
        assert httpx.post(f"{running.url}/v1/chat/completions", json=chat, timeout=60).status_code == 200
        assert httpx.post(f"{running.url}/v1/completions", json=body, timeout=60).status_code == 200
        assert seen == [-3, 1]
        r = httpx.post(f"{running.url}/v1/completions", json={**body, "priority": True}, timeout=60)  # not read as 1
        assert (r.status_code, r.json()["error"]["param"]) == (400, "priority"), r.text
    finally:
        running.close()


def test_priorities_under_preemption_leave_every_output_its_own(qwen2_triple: tuple) -> None:
    """A KV cache too small for the batch (preemptions), n = 2 samples, chunked prefill and speculative
    rounds, with mixed priorities: each request's outputs equal the ones it gets alone."""
    from logit_adjust_util import make_engine, run

    prompts = [[5, 9, 9, 17, 4, 9, 30, 4], [7, 30, 4], [9, 9, 30, 4, 4, 12, 13], [12, 13, 5, 9]]
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=14, n=2) for s in range(4)]
    alone = {f"r{i}": [o.token_ids for o in run(make_engine(qwen2_triple), {"x": (p, sp)})["x"]]
             for i, (p, sp) in enumerate(zip(prompts, params))}
    for kw in (dict(kv_cache_blocks=9), dict(kv_cache_blocks=9, max_num_batched_tokens=5),
               dict(kv_cache_blocks=12, speculative_tokens=2)):
        engine = make_engine(qwen2_triple, scheduling_policy="priority", max_num_seqs=3, max_model_len=32, **kw)
        for i, (p, sp, rank) in enumerate(zip(prompts, params, [2, 0, 1, 0])):
            engine.add_request(f"r{i}", p, sp, priority=rank)
        done = run(engine, {})
        assert {k: [o.token_ids for o in v] for k, v in done.items()} == alone, kw
        assert engine.scheduler.num_preemptions > 0 or "speculative_tokens" in kw, kw
        assert engine.scheduler.bm.num_free_blocks == engine.scheduler.bm.num_blocks


def test_a_forking_request_does_not_take_slots_ahead_of_a_more_urgent_one(qwen2_triple: tuple) -> None:
    """A low-priority request of n = 2 forks while an urgent one waits (it arrived during the low one's
    chunked prefill): the samples queue behind it instead of taking the free slot. Found by a review.
    numpy integers are priorities too, as vLLM takes them."""
    import numpy as np
    from logit_adjust_util import make_engine

    engine = make_engine(qwen2_triple, scheduling_policy="priority", max_num_seqs=2, max_num_batched_tokens=8)
    engine.add_request("low", list(range(10, 22)), SamplingParams(temperature=0.9, seed=1, max_tokens=20, n=2,
                                                                  ignore_eos=True), priority=np.int64(5))
    finished, step = [], 0
    while engine.has_unfinished_requests():
        if step == 1:
            engine.add_request("urgent", [40, 41, 42, 43, 44, 45], SamplingParams(max_tokens=3, ignore_eos=True),
                               priority=0)
        finished += [o.request_id for o in engine.step() if o.finished]
        step += 1
    assert finished == ["urgent", "low"]
    with pytest.raises(RastError, match="priority must be an integer"):
        engine.add_request("x", [5, 9], SamplingParams(max_tokens=1), priority=True)
