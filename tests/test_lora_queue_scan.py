"""What a step costs the host while requests wait for their LoRA adapter's slot (engine/scheduler.py): the
requests that wait are walked over once, not at every step, and the slots the running sequences hold are
read instead of every live request's. Oracles: the reads of the requests' LoRA fields a step makes (they
must not grow with the queue), FCFS admission order, and each request's tokens as its adapter alone
decodes them (test_lora_queue._want)."""
from __future__ import annotations

import pytest

import rast_engine.llm_engine as llm_engine_module
from rast_engine import LoRARequest, SamplingParams
from rast_engine.sequence import SequenceGroup
from test_engine import PROMPTS
from test_lora_modules import GREEDY
from test_lora_queue import _one_slot, _requests, _want

pytest.importorskip("peft")

QUEUED = 80  # requests waiting for c's load, and as many of the loaded m behind them


def _short(i: int) -> SamplingParams:
    """2 to 6 tokens: the m requests end at different steps, so almost every step admits one (each runs
    for a step at least, for the test to see it admitted)."""
    return SamplingParams(temperature=0.0, max_tokens=2 + i % 5, ignore_eos=True)


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async_scheduling"])
def test_a_step_does_not_scan_the_requests_that_wait_for_a_load(lora_adapters: tuple, ahead: bool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """max_loras=1, max_num_seqs=4: m's requests keep its slot held, so the QUEUED requests of c at the head
    of the queue wait through the whole test while those of m behind them are admitted, one or two a step
    (with async_scheduling, by steps scheduled ahead too). A step reads the LoRA fields (lora_pending,
    admitted) of a few requests, where a scan of the queue would read at least 2 * QUEUED; c loads once m's
    requests are all done, and every request decodes as its adapter alone."""
    reads = [0]

    class Counted(SequenceGroup):
        def __getattribute__(self, name: str) -> object:
            if name in ("lora_pending", "admitted"):
                reads[0] += 1
            return super().__getattribute__(name)

    monkeypatch.setattr(llm_engine_module, "SequenceGroup", Counted)
    engine = _one_slot(lora_adapters, max_num_seqs=4, async_output=ahead).llm_engine
    assert engine.async_scheduling == ahead
    req = _requests(lora_adapters)
    engine.add_request("m", PROMPTS[0], GREEDY, lora_request=req["math"])
    for i in range(QUEUED):
        engine.add_request(f"c{i}", PROMPTS[i % 4], GREEDY, lora_request=req["code"])
    for i in range(QUEUED):
        engine.add_request(f"m{i}", PROMPTS[i % 4], _short(i), lora_request="m")
    order: list[str] = []
    done: dict[str, list[int]] = {}
    for step in range(1500):
        reads[0] = 0
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        if 0 < step < 20:  # the first step admits m and the first m requests; c waits for m's held slot
            assert reads[0] < 40 and engine.groups["c0"].lora_pending is not None, (step, reads[0])
        order += [s.group.request_id for s in engine.scheduler.running if s.group.request_id not in order]
        if not engine.has_unfinished_requests():
            break
    assert order == ["m", *(f"m{i}" for i in range(QUEUED)), *(f"c{i}" for i in range(QUEUED))]
    assert done["m"] == _want(lora_adapters, "math", GREEDY, PROMPTS[0])
    for i in range(QUEUED):
        assert done[f"m{i}"] == _want(lora_adapters, "math", _short(i), PROMPTS[i % 4]), i
        assert done[f"c{i}"] == _want(lora_adapters, "code", GREEDY, PROMPTS[i % 4]), i


TWO = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)  # m1's: it ends while m0 runs
# each request's adapter (the math adapter's files under the name d too: another load) and prompt
WANT = {"m0": ("math", 0), "m1": ("math", 1), "m2": ("math", 2), "c1": ("code", 1), "c2": ("code", 3),
        "d1": ("math", 2)}


def _behind_two_waiting(lora_adapters: tuple, between: tuple[str, ...] = (), **priorities: int):  # noqa: ANN202
    """An engine (max_loras=1, max_num_seqs=2, the priority policy when ``priorities`` are given) where m0 runs
    while c1 and d1 wait for their adapters at the head of the queue, with the requests ``between`` (c2 by
    name: it waits on c1's load) behind them; then m1, which the first step admits, walking over them."""
    large, base, modules = lora_adapters
    engine = _one_slot(lora_adapters, max_num_seqs=2, **({"scheduling_policy": "priority"} if priorities else {}))
    engine = engine.llm_engine
    loras = {**_requests(lora_adapters), "d": LoRARequest("d", 3, modules["math"])}
    queue = (("m0", loras["math"]), ("c1", loras["code"]), ("d1", loras["d"]), *((r, "c") for r in between))
    for rid, lora in (*queue, ("m1", "m")):
        engine.add_request(rid, PROMPTS[WANT[rid][1]], TWO if rid == "m1" else GREEDY,
                           priority=priorities.get(rid, 0), lora_request=lora)
    engine.step()
    assert [s.group.request_id for s in engine.scheduler.running] == ["m0", "m1"]
    return engine


def _check(lora_adapters: tuple, engine, want_order: list[str]) -> None:  # noqa: ANN001
    """Step to the end: the requests first ran in ``want_order``, each with its tokens as its adapter alone."""
    order = [s.group.request_id for s in engine.scheduler.running]
    done: dict[str, list[int]] = {}
    for _ in range(400):
        if not engine.has_unfinished_requests():
            break
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        order += [s.group.request_id for s in engine.scheduler.running if s.group.request_id not in order]
    assert order == want_order
    for rid in want_order:
        name, prompt = WANT[rid]
        assert done[rid] == _want(lora_adapters, name, TWO if rid == "m1" else GREEDY, PROMPTS[prompt]), rid


def test_a_load_lets_its_requests_behind_another_waiting_one_run_at_once(lora_adapters: tuple) -> None:
    """m0 and m1 end, m idles: c1's adapter loads, and c2, behind d1 (still waiting), runs in the same step."""
    engine = _behind_two_waiting(lora_adapters, between=("c2",))
    _check(lora_adapters, engine, ["m0", "m1", "c1", "c2", "d1"])


def test_an_aborted_waiting_request_does_not_hide_the_one_behind_it(lora_adapters: tuple) -> None:
    """c1 is aborted and m2 added behind d1: m2 runs once m1 ends, while d1 waits for m's slot."""
    engine = _behind_two_waiting(lora_adapters)
    engine.add_request("m2", PROMPTS[2], GREEDY, lora_request="m")
    engine.abort_request("c1")
    _check(lora_adapters, engine, ["m0", "m1", "m2", "d1"])


def test_a_request_queued_between_waiting_ones_is_found(lora_adapters: tuple) -> None:
    """Priority policy: m2, more urgent than d1, is queued between c1 and d1 and runs once m1 ends."""
    engine = _behind_two_waiting(lora_adapters, m0=0, c1=0, d1=2, m1=5)
    engine.add_request("m2", PROMPTS[2], GREEDY, priority=1, lora_request="m")
    assert [s.group.request_id for s in engine.scheduler.waiting] == ["c1", "m2", "d1"]
    _check(lora_adapters, engine, ["m0", "m1", "m2", "c1", "d1"])
