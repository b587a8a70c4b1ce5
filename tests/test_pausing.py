"""vLLM's pause_generation / resume_generation (engine/pausing.py), the fence around an in-flight weight
update. Oracles: the same requests run without a pause (a pause that loads nothing is invisible), and HF
transformers for a load under mode "keep": R's cache from the old weights, continued by the new ones."""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from rast_engine import LLM, SamplingParams
from rast_engine.errors import RastError
from test_engine import hf_model
from test_weight_updates import KW, LONG, another_rl

PROMPTS = [[5, 17, 33, 9, 41, 8], LONG, [7, 7, 21, 60]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10, ignore_eos=True, seed=3, n=2)
AHEAD = {"in order": {}, "ahead": dict(async_output=True, async_scheduling=True)}


def started(llm: LLM, params: SamplingParams, steps: int, kind: str = "cumulative") -> list:
    """The engine with PROMPTS added (at most two running: the third waits) and ``steps`` steps taken;
    the outputs so far."""
    engine = llm.llm_engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, dataclasses.replace(params, output_kind=kind))
    return [o for _ in range(steps) for o in engine.step()]


def finals(llm: LLM, params: SamplingParams) -> dict[str, list[list[int]]]:
    return {f"r{i}": [c.token_ids for c in o.outputs]
            for i, o in enumerate(llm.generate(PROMPTS, params, use_tqdm=False))}


def gathered(outputs: list, delta: bool) -> dict[str, list[list[int]]]:
    """Each request's samples' tokens from its outputs: the last cumulative ones, or every delta joined."""
    got: dict[str, list[list[int]]] = {}
    for o in outputs:
        for c in o.outputs:
            seqs = got.setdefault(o.request_id, [[] for _ in range(SAMPLED.n)])
            seqs[c.index] = seqs[c.index] + c.token_ids if delta else c.token_ids
    return got


@pytest.fixture(scope="module")
def paths(qwen2_triple: tuple) -> list[str]:
    return list(map(str, qwen2_triple))


@pytest.mark.parametrize("ahead", AHEAD)
@pytest.mark.parametrize("kind", ["cumulative", "delta"])
def test_abort_ends_every_request_with_the_tokens_it_had(paths: list[str], ahead: str, kind: str) -> None:
    want = finals(LLM(*paths, **KW, max_num_seqs=2), SAMPLED)
    llm = LLM(*paths, **KW, max_num_seqs=2, **AHEAD[ahead])
    engine = llm.llm_engine
    outs = started(llm, SAMPLED, 4, kind) + engine.pause_generation(mode="abort", clear_cache=False)
    got = gathered(outs, delta=kind == "delta")
    last = {o.request_id: o for o in outs}
    assert set(last) == set(want) and all(o.finished for o in last.values())
    assert all(c.finish_reason == "abort" for o in last.values() for c in o.outputs)
    assert got["r2"] == [[], []] and len(last["r2"].outputs) == 1  # it never ran: its one unforked sample
    for rid in ("r0", "r1"):
        assert 0 < len(got[rid][0]) < SAMPLED.max_tokens
        assert all(g == w[:len(g)] for g, w in zip(got[rid], want[rid]))
    assert not engine.has_unfinished_requests() and engine.is_paused() and engine.scheduler.bm.cached
    with pytest.raises(RastError, match="paused"):
        engine.step()
    assert engine.pause_generation(mode="abort") == []  # already paused: nothing happens
    engine.resume_generation()
    assert not engine.is_paused() and finals(llm, SAMPLED) == want


@pytest.mark.parametrize("ahead", AHEAD)
def test_wait_runs_every_request_to_its_end_and_clears_the_cache(paths: list[str], ahead: str) -> None:
    want = finals(LLM(*paths, **KW, max_num_seqs=2), SAMPLED)
    llm = LLM(*paths, **KW, max_num_seqs=2, **AHEAD[ahead])
    engine = llm.llm_engine
    outs = started(llm, SAMPLED, 3) + engine.pause_generation(mode="wait")
    last = {o.request_id: o for o in outs}
    assert {r: [c.token_ids for c in o.outputs] for r, o in last.items()} == want
    assert all(o.finished for o in last.values()) and not engine.scheduler.bm.cached
    with pytest.raises(RastError, match="mode"):
        engine.pause_generation(mode="drain")


@pytest.mark.parametrize("ahead", AHEAD)
def test_keep_then_resume_is_invisible(paths: list[str], ahead: str) -> None:
    """The batch on the device lands, nothing runs while paused (a request added then waits), and the
    requests go on to the tokens of a run never paused."""
    want = finals(LLM(*paths, **KW, max_num_seqs=2), SAMPLED)
    llm = LLM(*paths, **KW, max_num_seqs=2, **AHEAD[ahead])
    engine = llm.llm_engine
    outs = started(llm, SAMPLED, 3)
    outs += engine.pause_generation(mode="keep")
    assert engine._in_flight is None and engine.is_paused()
    engine.add_request("late", PROMPTS[0], GREEDY)
    with pytest.raises(RastError, match="paused"):
        engine.step()
    engine.resume_generation()
    while engine.has_unfinished_requests():
        outs += engine.step()
    last = {o.request_id: o for o in outs}
    assert {r: [c.token_ids for c in last[r].outputs] for r in want} == want
    assert last["late"].outputs[0].token_ids == finals(LLM(*paths, **KW), GREEDY)["r0"][0]


@torch.no_grad()
def hf_switched(triple: list[str], rl2: str, ids: list[int], switch: int, steps: int, lam: float,
                vocab: int) -> list[int]:
    """Greedy RAST over the first ``vocab`` ids where R's cache holds the old R's keys and values of the
    first ``switch`` positions and the new R computes every later one; M and S unchanged."""
    large, rl, base = (hf_model(Path(p)) for p in triple)
    new = hf_model(Path(rl2))
    cache = DynamicCache()
    # transformers renames past_key_values to cache (5.40 drops the old name; the device image's 5.17 lacks it)
    kw = {"cache" if "cache" in inspect.signature(rl.forward).parameters else "past_key_values": cache}
    rl(torch.tensor([ids[:switch]]), use_cache=True, **kw)
    ids, fed = list(ids), switch
    for _ in range(steps):
        x = torch.tensor([ids])
        r = new(torch.tensor([ids[fed:]]), use_cache=True, **kw).logits[0, -1]
        fed = len(ids)
        z = large(x).logits[0, -1, :vocab] + lam * (r[:vocab] - base(x).logits[0, -1, :vocab])
        ids.append(int(z.argmax()))
    return ids


@pytest.mark.parametrize("ahead", AHEAD)
def test_a_load_under_keep_goes_on_with_the_new_weights_over_the_old_kv(paths: list[str], ahead: str,
                                                                        qwen2_triple: tuple, tmp_path: Path) -> None:
    """vLLM's in-flight weight update. The kept request: HF's tokens with R's old cache continued by the
    new R. Requests with the kept one's prompt added while paused, before or after the load, find none of
    its blocks in the prefix cache: their tokens are those of an engine built on the new R."""
    rl2 = str(another_rl(qwen2_triple, "qwen2", tmp_path))
    llm = LLM(*paths, **KW, **AHEAD[ahead])
    engine = llm.llm_engine
    engine.add_request("kept", LONG, GREEDY)
    engine.step()
    engine.step()
    with pytest.raises(RastError, match="unfinished"):
        llm.load_weights(path=rl2)
    made = [o for o in engine.pause_generation(mode="keep")]
    known = len(engine.groups["kept"].seqs[0].token_ids)  # the last token's K/V is not computed yet
    engine.add_request("queued", LONG, GREEDY)  # added before the load, run after it: all new weights
    llm.load_weights(path=rl2)
    engine.resume_generation()
    engine.add_request("after", LONG, GREEDY)
    while engine.has_unfinished_requests():
        made += engine.step()
    last = {o.request_id: o.outputs[0].token_ids for o in made if o.finished}
    before = known - len(LONG)
    assert last["kept"][:before] == finals(LLM(*paths, **KW), GREEDY)["r1"][0][:before]
    want = hf_switched(paths, rl2, LONG + last["kept"][:before], known - 1, GREEDY.max_tokens - before, KW["lam"],
                       engine.vocab_size)
    assert last["kept"] == want[len(LONG):]
    assert last["after"] == last["queued"] == finals(LLM(paths[0], rl2, paths[2], **KW), GREEDY)["r1"][0]
    assert last["kept"] != last["after"]


def test_a_step_failing_inside_wait_loses_no_output(paths: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Delta outputs: the steps before the failure are delivered by the next call, the failed one is undone,
    and the tokens are those of a run that never failed."""
    want = finals(LLM(*paths, **KW, max_num_seqs=2), SAMPLED)
    llm = LLM(*paths, **KW, max_num_seqs=2)
    engine = llm.llm_engine
    outs = started(llm, SAMPLED, 2, "delta")
    launch, calls = engine.runner.launch, []

    def failing_once(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected")
        return launch(*args, **kw)

    monkeypatch.setattr(engine.runner, "launch", failing_once)
    with pytest.raises(RuntimeError, match="injected"):
        engine.pause_generation(mode="wait")
    assert not engine.is_paused()
    outs += engine.pause_generation(mode="wait")
    assert gathered(outs, delta=True) == want and engine.is_paused()
