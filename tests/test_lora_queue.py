"""A request whose LoRA adapter finds no slot waits for one (vLLM's behaviour, engine/lora_registry.py): its
adapter is read and checked when it is added and loaded by the scheduler once a slot can be freed, while
the requests behind it that need no new slot go first. Oracle: the engine whose small_rl is that adapter
alone (test_lora.py checks it against PEFT), or M alone without one, as in test_lora_runtime.py."""
from __future__ import annotations

import functools

import pytest
import torch

from rast_engine import LLM, LoRARequest, SamplingParams
from rast_engine.errors import RastError
from test_engine import PROMPTS
from test_lora_modules import GREEDY, KW, SAMPLED

pytest.importorskip("peft")

LONG = list(range(3, 40))  # ten full blocks of 4: a prefix-cache hit is likely whenever one is allowed


@functools.lru_cache(maxsize=None)
def _alone(large: str, base: str, adapter: str | None) -> LLM:
    """The engine whose RL model is ``adapter`` alone (None: M alone)."""
    return LLM(large, block_size=4, kv_cache_blocks=96) if adapter is None else LLM(large, adapter, base, **KW)


def _want(lora_adapters: tuple, name: str | None, params: SamplingParams, prompt: object) -> list[int]:
    """The prompt's tokens from the engine whose RL model is adapter ``name`` alone."""
    large, base, modules = lora_adapters
    llm = _alone(str(large), str(base), None if name is None else modules[name])
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids


def _requests(lora_adapters: tuple) -> dict[str, LoRARequest]:
    modules = lora_adapters[2]
    return {"math": LoRARequest("m", 1, modules["math"]), "code": LoRARequest("c", 2, modules["code"])}


def _one_slot(lora_adapters: tuple, **kw: object) -> LLM:
    large, base, _ = lora_adapters
    return LLM(str(large), small_base=str(base), max_loras=1, max_lora_rank=4, **{**KW, **kw})


def _drain(engine) -> list[str]:  # noqa: ANN001 - an LLMEngine
    """Step to the end; the request ids in the order they finished (their token ids in engine.done)."""
    order, engine.done = [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                order.append(out.request_id)
                engine.done[out.request_id] = out.outputs[0].token_ids
    return order


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_batch_of_more_adapters_than_slots_waits_and_decodes_as_each_alone(lora_adapters: tuple,
                                                                             params: SamplingParams) -> None:
    """max_loras=1, every prompt under both path adapters in one generate(): the second adapter's requests
    wait for the first's to end (they used to refuse the whole batch)."""
    llm = _one_slot(lora_adapters)
    reqs = _requests(lora_adapters)
    prompts = [p for p in PROMPTS for _ in reqs]
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=list(reqs.values()) * len(PROMPTS))
    for i, out in enumerate(outs):
        name = list(reqs)[i % 2]
        assert out.outputs[0].token_ids == _want(lora_adapters, name, params, prompts[i]), (i, name)
    registry = llm.llm_engine.model_set.lora
    assert not registry.pending and registry.slots == ["c"]  # m was evicted for c once idle


def test_waiting_requests_do_not_hold_up_those_of_loaded_adapters(lora_adapters: tuple,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """m2, queued after c1 whose adapter waits for m's slot, is admitted at once; c1 and c2 share c's one
    load (read and checked once, when c1 was added) after both m requests end."""
    import rast_engine.lora_registry as registry_module

    reads = []
    read = registry_module.read_adapter
    monkeypatch.setattr(registry_module, "read_adapter", lambda name, *a: reads.append(name) or read(name, *a))
    llm = _one_slot(lora_adapters)
    engine, registry, reqs = llm.llm_engine, llm.llm_engine.model_set.lora, _requests(lora_adapters)
    for rid, prompt, name in (("m1", 0, "math"), ("c1", 1, "code"), ("m2", 2, "math"), ("c2", 3, "code")):
        engine.add_request(rid, PROMPTS[prompt], GREEDY, lora_request=reqs[name])
    assert reads == ["m", "c"] and registry.pending["c"].groups == [engine.groups["c1"], engine.groups["c2"]]
    assert [engine.groups[r].lora_slot for r in ("c1", "c2")] == [-1, -1]
    assert engine.stats().lora_waiting == ("c", "m")
    with pytest.raises(RuntimeError, match="waits for its LoRA adapter"):  # never hashed under another root
        engine.block_manager.uncached_tokens(engine.groups["c1"].seqs[0])
    engine.step()
    assert sorted(s.group.request_id for s in engine.scheduler.running) == ["m1", "m2"]
    assert [s.group.request_id for s in engine.scheduler.waiting] == ["c1", "c2"]
    stats = engine.stats()
    assert (stats.lora_running, stats.lora_waiting) == (("m",), ("c",))
    while engine.groups["c1"].lora_pending is not None:
        engine.step()
    c1, c2 = engine.groups["c1"], engine.groups["c2"]
    assert c1.lora_slot == c2.lora_slot == 0 and c1.cache_root == c2.cache_root == registry.roots["c"]
    assert "m1" not in engine.groups and "m2" not in engine.groups and not registry.pending
    order = _drain(engine)
    assert set(order) == {"c1", "c2"} and reads == ["m", "c"]
    for rid, prompt, name in (("c1", 1, "code"), ("c2", 3, "code")):
        assert engine.done[rid] == _want(lora_adapters, name, GREEDY, PROMPTS[prompt])


def test_the_prefix_cache_is_rooted_at_the_waited_for_load(lora_adapters: tuple) -> None:
    """One long prompt with no adapter, under m and under c: c's request waits for m's slot and, once its
    adapter is loaded, finds none of the blocks computed before (M alone's, m's); a later request of the same
    load reuses c's."""
    llm = _one_slot(lora_adapters, enable_prefix_caching=True)
    reqs, bm = _requests(lora_adapters), llm.llm_engine.block_manager
    outs = llm.generate([LONG] * 3, GREEDY, use_tqdm=False, lora_request=[None, reqs["math"], reqs["code"]])
    for out, name in zip(outs, (None, "math", "code")):
        assert out.outputs[0].token_ids == _want(lora_adapters, name, GREEDY, LONG), name
    assert bm.prefix_hits == 0
    again = llm.generate([LONG], GREEDY, use_tqdm=False, lora_request=reqs["code"])
    assert again[0].outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert bm.prefix_hits == (len(LONG) - 1) // 4  # every full block of the prompt but its last


def test_an_aborted_waiting_request_leaves_nothing_behind(lora_adapters: tuple) -> None:
    llm = _one_slot(lora_adapters)
    engine, registry, reqs = llm.llm_engine, llm.llm_engine.model_set.lora, _requests(lora_adapters)
    engine.add_request("busy", PROMPTS[0], GREEDY, lora_request=reqs["math"])
    engine.add_request("c1", PROMPTS[1], GREEDY, lora_request=reqs["code"])
    engine.add_request("c2", PROMPTS[2], GREEDY, lora_request="c")  # by name: it waits on the same load
    engine.abort_request("c1")
    assert registry.pending["c"].groups == [engine.groups["c2"]]
    engine.step()
    engine.abort_request("c2")
    assert not registry.pending and list(engine.groups) == ["busy"] and not engine.scheduler.waiting
    assert engine.stats().lora_waiting == () and registry.slots == ["m"]
    with pytest.raises(RastError, match="not a loaded LoRA adapter"):  # c's wait is gone with its requests
        engine.add_request("c3", PROMPTS[2], GREEDY, lora_request="c")
    assert _drain(engine) == ["busy"]
    assert engine.done["busy"] == _want(lora_adapters, "math", GREEDY, PROMPTS[0])
    outs = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False, lora_request=reqs["code"])
    assert [o.outputs[0].token_ids for o in outs] == [_want(lora_adapters, "code", GREEDY, p) for p in PROMPTS[:2]]


def test_a_waiting_adapter_is_checked_when_its_request_is_added(lora_adapters: tuple) -> None:
    """No slot free (code runs in the only one): a bad adapter is still refused at once, with the error of a
    free slot, and a name waiting to load is known by its path."""
    large, base, modules = lora_adapters
    llm = LLM(str(large), small_base=str(base), max_loras=1, max_lora_rank=3, **KW)
    engine, registry = llm.llm_engine, llm.llm_engine.model_set.lora
    engine.add_request("busy", PROMPTS[0], GREEDY, lora_request=LoRARequest("c", 1, modules["code"]))
    refused = [(LoRARequest("m", 1, modules["math"]), "rank 4 over max_lora_rank 3"),
               (LoRARequest("b", 1, str(base)), "not a PEFT LoRA adapter"), ("x", "not a loaded LoRA adapter")]
    for choice, match in refused:
        with pytest.raises(RastError, match=match):
            engine.add_request("r", PROMPTS[1], GREEDY, lora_request=choice)
    engine.add_request("w", PROMPTS[1], GREEDY, lora_request=LoRARequest("c2", 1, modules["code"]))
    with pytest.raises(RastError, match="waits to be loaded from"):
        engine.add_request("r", PROMPTS[1], GREEDY, lora_request=LoRARequest("c2", 1, modules["math"]))
    assert list(engine.groups) == ["busy", "w"] and list(registry.pending) == ["c2"]
    with pytest.raises(RastError, match="in use or loaded explicitly"):  # scoring cannot wait: refused
        engine.score([[5, 6, 7]], lora_request="c2")
    with pytest.raises(RastError, match="requests wait for a slot"):
        engine.load_lora_adapter("c2", modules["code"])
    with pytest.raises(RastError, match="abort them"):
        engine.unload_lora_adapter("c2")
    assert _drain(engine) == ["busy", "w"]
    assert engine.done["w"] == _want(lora_adapters, "code", GREEDY, PROMPTS[1])


def test_an_adapter_that_can_never_get_a_slot_is_refused(lora_adapters: tuple) -> None:
    """Every slot pinned (loaded at start or explicitly): a path request could wait forever, so it is
    refused; and while one waits, an explicit load may not pin the last slot it could take."""
    large, base, modules = lora_adapters
    reqs = _requests(lora_adapters)
    pinned = LLM(str(large), small_base=str(base), lora_modules={"math": modules["math"]}, **KW).llm_engine
    with pytest.raises(RastError, match="in use or loaded explicitly"):
        pinned.add_request("r", PROMPTS[0], GREEDY, lora_request=reqs["code"])
    assert not pinned.groups and not pinned.model_set.lora.pending
    llm = LLM(str(large), small_base=str(base), lora_modules={"math": modules["math"]}, max_loras=2,
              max_lora_rank=4, **KW)
    engine = llm.llm_engine
    engine.add_request("busy", PROMPTS[0], GREEDY, lora_request=reqs["code"])  # the free slot
    engine.add_request("w", PROMPTS[1], GREEDY, lora_request=LoRARequest("c2", 1, modules["code"]))
    with pytest.raises(RastError, match="would leave no slot"):
        engine.load_lora_adapter("x", modules["math"])
    assert engine.lora_adapters() == {"math": modules["math"], "c": modules["code"]}
    assert _drain(engine) == ["busy", "w"]
    assert engine.done["w"] == _want(lora_adapters, "code", GREEDY, PROMPTS[1])


def _c_waits_beside_idle(lora_adapters: tuple, max_loras: int) -> LLM:
    """m0 runs in the only sequence slot; c1 waits for its adapter, which found every LoRA slot taken (m0's, and
    those of requests queued then aborted): now all but m's slot hold idle adapters, and c1 waits for m0's
    sequence slot, its load with it."""
    large, base, modules = lora_adapters
    llm = LLM(str(large), small_base=str(base), max_loras=max_loras, max_lora_rank=4, max_num_seqs=1, **KW)
    engine, reqs = llm.llm_engine, _requests(lora_adapters)
    engine.add_request("m0", PROMPTS[0], GREEDY, lora_request=reqs["math"])
    engine.step()
    idle = [f"x{k}" for k in range(max_loras - 1)]
    for k, rid in enumerate(idle):
        engine.add_request(rid, PROMPTS[1], GREEDY, lora_request=LoRARequest(rid, 3 + k, modules["math"]))
    engine.add_request("c1", PROMPTS[1], GREEDY, lora_request=reqs["code"])
    engine.abort_request(idle)
    assert engine.model_set.lora.slots == ["m", *idle] and list(engine.model_set.lora.pending) == ["c"]
    return llm


def test_a_score_call_takes_no_slot_the_waiting_loads_need(lora_adapters: tuple) -> None:
    """Scoring cannot wait: with c's load waiting and one idle slot, a new adapter is refused (it would take
    the slot c needs) and nothing changes, and so is d, whose load waits behind c's; c itself may load (no
    other load waits), scores as c alone, and its waiting request then decodes as c alone. With two idle
    slots the new adapter loads into one."""
    large, base, modules = lora_adapters
    llm = _c_waits_beside_idle(lora_adapters, max_loras=2)
    engine, registry = llm.llm_engine, llm.llm_engine.model_set.lora
    seq = [[5, 6, 7, 8, 9]]
    with pytest.raises(RastError, match=r"wait for LoRA slots for \['c'\], which load first"):
        engine.score(seq, lora_request=LoRARequest("s", 9, modules["code"]))
    assert registry.slots == ["m", "x0"] and list(registry.pending) == ["c"] and "s" not in registry.roots
    engine.add_request("d1", PROMPTS[2], GREEDY, lora_request=LoRARequest("d", 8, modules["math"]))
    with pytest.raises(RastError, match=r"wait for LoRA slots for \['c'\]"):  # d's load, behind c's, may not go first
        engine.score(seq, lora_request="d")
    engine.abort_request("d1")
    alone = _alone(str(large), str(base), modules["code"]).llm_engine.score(seq)[0].combined
    torch.testing.assert_close(engine.score(seq, lora_request="c")[0].combined, alone, rtol=0, atol=1e-5)
    assert registry.slots == ["m", "c"] and not registry.pending and engine.groups["c1"].lora_slot == 1
    assert _drain(engine) == ["m0", "c1"]
    assert engine.done["c1"] == _want(lora_adapters, "code", GREEDY, PROMPTS[1])
    roomy = _c_waits_beside_idle(lora_adapters, max_loras=3).llm_engine
    torch.testing.assert_close(roomy.score(seq, lora_request=LoRARequest("s", 9, modules["code"]))[0].combined,
                               alone, rtol=0, atol=1e-5)
    assert roomy.model_set.lora.slots == ["m", "s", "x1"] and list(roomy.model_set.lora.pending) == ["c"]
    assert _drain(roomy) == ["m0", "c1"]
    assert roomy.done["c1"] == _want(lora_adapters, "code", GREEDY, PROMPTS[1])


def test_an_explicit_load_goes_first_but_leaves_the_queue_a_slot(lora_adapters: tuple) -> None:
    """An administrator's load takes the idle slot while c's load waits (usable at once, like vLLM's route);
    a second would pin the last slot c could take and is refused. c then loads into m's slot once m0 ends,
    ahead of a later request for the explicit adapter, and each decodes as its adapter alone."""
    large, base, modules = lora_adapters
    engine = _c_waits_beside_idle(lora_adapters, max_loras=2).llm_engine
    engine.load_lora_adapter("p", modules["math"])
    with pytest.raises(RastError, match="would leave no slot they could ever take"):
        engine.load_lora_adapter("q", modules["math"])
    assert engine.lora_adapters() == {"m": modules["math"], "p": modules["math"]}
    engine.add_request("p1", PROMPTS[2], GREEDY, lora_request="p")
    assert _drain(engine) == ["m0", "c1", "p1"] and engine.model_set.lora.slots == ["c", "p"]
    assert engine.done["c1"] == _want(lora_adapters, "code", GREEDY, PROMPTS[1])
    assert engine.done["p1"] == _want(lora_adapters, "math", GREEDY, PROMPTS[2])
