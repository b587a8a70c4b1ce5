"""Requests that wait for a LoRA slot keep their place in the queue (engine/lora_registry.py): a slot is held
only by admitted requests, so requests for a loaded adapter that arrive after a waiting one never keep its
slot from it, as vLLM counts only scheduled requests' adapters. Oracles: the admission order FCFS allows,
and each request's tokens as its adapter alone decodes them (test_lora_queue._want)."""
from __future__ import annotations

import pytest

from rast_engine import LLM, SamplingParams
from test_engine import PROMPTS
from test_lora_modules import GREEDY, KW
from test_lora_queue import LONG, _one_slot, _requests, _want

pytest.importorskip("peft")


def _admissions(engine) -> list[str]:  # noqa: ANN001 - an LLMEngine
    """Step to the end; the request ids in the order their first sequence ran."""
    order: list[str] = []
    while engine.has_unfinished_requests():
        engine.step()
        order += [s.group.request_id for s in engine.scheduler.running if s.group.request_id not in order]
    return order


def test_later_requests_of_a_loaded_adapter_go_after_a_waiting_one(lora_adapters: tuple) -> None:
    """max_loras=1, one sequence at a time: m runs, c waits for the slot, then three more m requests by name.
    FCFS admits c before them; they wait for m's reload (their slot taken back before any ran)."""
    engine = _one_slot(lora_adapters, max_num_seqs=1).llm_engine
    req = _requests(lora_adapters)
    engine.add_request("m0", PROMPTS[0], GREEDY, lora_request=req["math"])
    engine.add_request("c", PROMPTS[1], GREEDY, lora_request=req["code"])
    for k in range(3):
        engine.add_request(f"m{k + 1}", PROMPTS[2 + k % 2], GREEDY, lora_request="m")
    outs = {}
    order: list[str] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.outputs[0].token_ids
        order += [s.group.request_id for s in engine.scheduler.running if s.group.request_id not in order]
    assert order == ["m0", "c", "m1", "m2", "m3"]
    assert outs["c"] == _want(lora_adapters, "code", GREEDY, PROMPTS[1])
    for k in range(3):
        assert outs[f"m{k + 1}"] == _want(lora_adapters, "math", GREEDY, PROMPTS[2 + k % 2])


def test_a_waiting_adapter_is_loaded_between_requests_of_another(lora_adapters: tuple) -> None:
    """m requests one at a time, each added when the last ended: the slot is free of admitted requests
    between them, and the waiting c takes it then, not after the m traffic stops."""
    engine = _one_slot(lora_adapters).llm_engine
    req = _requests(lora_adapters)
    engine.add_request("m0", PROMPTS[0], GREEDY, lora_request=req["math"])
    engine.add_request("c", PROMPTS[1], GREEDY, lora_request=req["code"])
    added = 1
    for _ in range(3 * GREEDY.max_tokens):
        if not any(r.startswith("m") for r in engine.groups):
            engine.add_request(f"m{added}", PROMPTS[added % 4], GREEDY, lora_request="m")
            added += 1
        engine.step()
        if engine.groups["c"].lora_pending is None:
            break
    assert engine.groups["c"].lora_pending is None and engine.groups["c"].lora_slot == 0 and added == 2
    assert _admissions(engine)[:1] == ["c"]  # then the m request, reloaded


def test_a_waiting_urgent_request_does_not_queue_anothers_samples(lora_adapters: tuple) -> None:
    """scheduling_policy="priority": samples forked at their first draw queue behind a more urgent waiting
    request, but not behind one that waits for its adapter's slot (it could not take theirs)."""
    n3 = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, seed=5, n=3)

    def queued_at_fork(urgent: bool) -> int:
        engine = _one_slot(lora_adapters, scheduling_policy="priority").llm_engine
        req = _requests(lora_adapters)
        engine.add_request("busy", PROMPTS[0], GREEDY, priority=1, lora_request=req["math"])
        engine.step()  # busy runs: m's slot is held until it ends
        if urgent:
            engine.add_request("urgent", PROMPTS[1], GREEDY, priority=0, lora_request=req["code"])
        engine.add_request("s", PROMPTS[2], n3, priority=1, lora_request="m")
        while not engine.groups["s"].forked:
            engine.step()
        assert not urgent or engine.groups["urgent"].lora_pending is not None  # it still waits for m's slot
        return sum(s in engine.scheduler.waiting for s in engine.groups["s"].seqs)

    assert queued_at_fork(urgent=True) == queued_at_fork(urgent=False) == 0


def test_no_adapter_is_evicted_for_a_request_that_cannot_run_yet(lora_adapters: tuple) -> None:
    """Priority policy, max_num_seqs=1, two slots: while m runs, the urgent c waits ahead of x1, whose x is
    loaded; x stays loaded (with its prefix-cache root) until a sequence slot frees for c to run in."""
    from rast_engine import LoRARequest

    large, base, modules = lora_adapters
    engine = LLM(str(large), small_base=str(base), max_loras=2, max_lora_rank=4, max_num_seqs=1,
                 scheduling_policy="priority", **KW).llm_engine
    registry, req = engine.model_set.lora, _requests(lora_adapters)
    engine.add_request("m0", PROMPTS[0], GREEDY, priority=0, lora_request=req["math"])
    engine.step()  # m0 runs in the only sequence slot
    engine.add_request("x1", PROMPTS[3], GREEDY, priority=5, lora_request=LoRARequest("x", 3, modules["math"]))
    engine.add_request("c", PROMPTS[1], GREEDY, priority=1, lora_request=req["code"])  # both slots used: waits
    assert registry.slots == ["m", "x"] and engine.groups["c"].lora_pending is not None
    engine.step()
    assert registry.slots == ["m", "x"] and engine.groups["c"].lora_pending is not None
    assert _admissions(engine) == ["m0", "c", "x1"]


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async_scheduling"])
def test_no_adapter_is_evicted_for_a_request_the_kv_cache_cannot_take(lora_adapters: tuple, ahead: bool,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Priority policy, max_loras=1, 24 KV blocks: c (21 blocks) waits for m's slot while m0 runs, then for
    blocks while an adapter-less request holds some. m, idle, stays loaded with its prefix-cache root the
    whole time: m1 by name only is admitted at once and reuses m0's prompt blocks; c is loaded once, after
    both end. With async_scheduling the steps scheduled ahead (Scheduler.schedule_ahead) do the same.
    Oracle: each request's tokens as its adapter alone decodes them."""
    import rast_engine.lora_registry as registry_module

    writes: list[int] = []
    write = registry_module.write_slot
    monkeypatch.setattr(registry_module, "write_slot", lambda view, slot, deltas: writes.append(slot)
                        or write(view, slot, deltas))
    engine = _one_slot(lora_adapters, scheduling_policy="priority", kv_cache_blocks=24,
                       async_output=ahead).llm_engine
    assert engine.async_scheduling == ahead
    registry, bm, req = engine.model_set.lora, engine.block_manager, _requests(lora_adapters)
    free = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    longer = list(range(3, 87))  # 84 tokens: 21 blocks of 4
    engine.add_request("m0", LONG, GREEDY, priority=0, lora_request=req["math"])
    engine.add_request("free", PROMPTS[0], free, priority=0)
    engine.step()
    engine.add_request("c", longer, GREEDY, priority=1, lora_request=req["code"])
    root, done = registry.roots["m"], {}
    while "m0" in engine.groups:
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    engine.step()  # m is idle: c could take its slot, but not the blocks it needs
    assert "free" in engine.groups and engine.groups["c"].lora_pending is not None
    assert registry.slots == ["m"] and registry.roots["m"] == root
    hits = bm.prefix_hits
    engine.add_request("m1", LONG, GREEDY, priority=0, lora_request="m")
    engine.step()
    assert engine.groups["m1"].admitted and bm.prefix_hits - hits == (len(LONG) - 1) // 4
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    assert writes == [0, 0]  # m's one load, then c's: m was never evicted and reloaded
    want = {"m0": ("math", LONG), "m1": ("math", LONG), "c": ("code", longer), "free": (None, PROMPTS[0])}
    for rid, (name, prompt) in want.items():
        params = free if rid == "free" else GREEDY
        assert done[rid] == _want(lora_adapters, name, params, prompt), rid
