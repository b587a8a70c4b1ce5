"""The engine under random interleavings of add_request, bad requests, abort_request, LoRA unloads, pauses of
each mode, M's weights written again (while paused), resumes and step (hypothesis' stateful testing), in a KV
cache small enough to preempt, with chunked prefill, prefix caching, forks of n > 1, steps launched ahead,
speculative rounds and per-request LoRA adapters (two loaded at start, two more by path into the one slot
left, each evicting the other when idle, or waiting in the queue while the other's requests live). Oracles
are the engine's promises, checked after every operation:
- every KV block's reference count equals the number of live sequences whose table holds it, and a block
  is on the free list iff that count is 0 (nothing leaked, nothing freed twice);
- a refused request (RastError) changes nothing: the same requests, the same free blocks;
- a request's logits processor sees every draw of every sample with that sample's output so far, and
  nothing else (speculative rounds refuse processors, changing nothing);
- a finished request has its n samples of exactly max_tokens tokens (ignore_eos), reported once, and an
  aborted one is never reported again; a pause in mode "abort" ends every request (each reported once,
  with at most max_tokens tokens), "wait" runs every one to its end, and nothing is left on the device;
- a load is refused only while requests are unfinished and the engine is not paused;
- a live request's slot holds the adapter it asked for (loads, unloads and evictions never touch it), or it
  waits for that adapter's one load, which the requests waiting for it, and only they, share;
- a path adapter's request is never refused for want of a slot: one slot is never pinned, so it waits;
- the scheduler's scans skip only requests that wait for their adapter's load, and its loads see the slots
  admitted requests hold;
- once drained, every block is free.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from rast_engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from rast_engine.errors import RastError
from test_lora import make_adapter

peft = pytest.importorskip("peft")
BLOCKS, BS, MAX_LEN = 12, 4, 40
CONFIGS = {
    "ahead": dict(async_output=True, async_scheduling=True, max_num_batched_tokens=12),
    "speculative": dict(speculative_tokens=2, max_num_batched_tokens=16),
}


def _record(calls: list[list[int]], output_ids: list[int], z: torch.Tensor) -> torch.Tensor:
    calls.append(list(output_ids))
    return z


def check_blocks(engine: LLMEngine) -> None:
    bm = engine.block_manager
    held = Counter(b for g in engine.groups.values() for s in g.seqs for b in s.block_table)
    assert [bm.ref_counts[b] for b in range(bm.num_blocks)] == [held[b] for b in range(bm.num_blocks)]
    assert set(bm.free_list) == {b for b in range(bm.num_blocks) if held[b] == 0}


class EngineMachine(RuleBasedStateMachine):
    engine: LLMEngine  # set per configuration below; drained at each run's end, so runs may share it
    loras: tuple = (None,)
    seen: set  # the adapters requests were admitted with, across the runs
    waited: set  # the adapters requests waited for a slot for, across the runs

    def __init__(self) -> None:
        super().__init__()
        self.expected: dict[str, SamplingParams] = {}  # live request -> its params
        self.chosen: dict[str, str | None] = {}  # live request -> the adapter it asked for
        self.calls: dict[str, list[list[int]]] = {}  # live request -> its logits processor's calls
        self.ended: set[str] = set()  # finished or aborted: never reported again
        self.count = 0

    def _step(self) -> None:
        self._take(self.engine.step())

    def _take(self, outputs: list, aborted: bool = False) -> None:
        """``aborted``: pause_generation(mode="abort")'s, where a request may end early (an n > 1 request
        not forked yet reports its one sample)."""
        for out in outputs:
            assert out.request_id not in self.ended, f"{out.request_id} reported after it ended"
            if out.finished:
                params = self.expected.pop(out.request_id)
                if aborted:
                    assert len(out.outputs) in (1, params.n) and all(
                        len(c.token_ids) <= params.max_tokens and c.finish_reason in ("length", "abort")
                        for c in out.outputs)
                else:
                    assert len(out.outputs) == params.n
                    assert all(len(c.token_ids) == params.max_tokens and c.finish_reason == "length"
                               for c in out.outputs)
                    # the processor saw every draw of every sample with that sample's output so far, and
                    # nothing else (a recomputed draw may be seen twice)
                    seen = {tuple(ids) for ids in self.calls[out.request_id]}
                    drawn = {tuple(c.token_ids[:t]) for c in out.outputs for t in range(params.max_tokens)}
                    assert not params.logits_processors or seen == drawn, (seen, drawn)
                self.calls.pop(out.request_id)
                self.ended.add(out.request_id)
                self.chosen.pop(out.request_id)

    @rule(length=st.integers(1, 20), n=st.integers(1, 3), max_tokens=st.integers(1, 12),
          greedy=st.booleans(), seed=st.integers(0, 2**31), lora=st.integers(0, 4), logprobs=st.booleans(),
          processed=st.booleans())
    def add(self, length: int, n: int, max_tokens: int, greedy: bool, seed: int, lora: int, logprobs: bool,
            processed: bool) -> None:
        rid = f"r{self.count}"
        self.count += 1
        calls: list[list[int]] = []  # the output ids each logits processor call saw
        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=0.0 if greedy else 1.0, seed=seed,
                                ignore_eos=True, prompt_logprobs=1 if logprobs else None, output_kind="final_only",
                                logits_processors=[functools.partial(_record, calls)] if processed else None)
        prompt = [(seed + 7 * i) % 90 + 4 for i in range(length)]
        choice = self.loras[lora % len(self.loras)]
        if processed and self.engine.config.speculative_tokens:
            before = (dict(self.engine.groups), self.engine.block_manager.num_free_blocks)
            with pytest.raises(RastError, match="speculative"):
                self.engine.add_request(rid, prompt, params, lora_request=choice)
            assert (dict(self.engine.groups), self.engine.block_manager.num_free_blocks) == before
            params = dataclasses.replace(params, logits_processors=None)  # refused: added without them
        self.engine.add_request(rid, prompt, params, lora_request=choice)  # a path adapter with no slot waits
        self.expected[rid] = params
        self.calls[rid] = calls
        self.chosen[rid] = getattr(choice, "lora_name", choice)
        self.seen.add(self.chosen[rid])
        if self.engine.groups[rid].lora_pending is not None:
            self.waited.add(self.chosen[rid])

    @rule(kind=st.sampled_from(["too_long", "unknown_lora", "logprobs", "duplicate_id", "token_range"]))
    def add_bad(self, kind: str) -> None:
        before = (dict(self.engine.groups), self.engine.block_manager.num_free_blocks)
        prompt, params, rid, lora = [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True), f"bad{self.count}", None
        if kind == "too_long":
            prompt = list(range(4, 4 + MAX_LEN))
        elif kind == "unknown_lora":
            lora = "law"
        elif kind == "logprobs":
            params = SamplingParams(max_tokens=2, logprobs=10**6)
        elif kind == "duplicate_id" and self.expected:
            rid = next(iter(self.expected))
        else:
            prompt = [5, 10**7]
        with pytest.raises(RastError):
            self.engine.add_request(rid, prompt, params, lora_request=lora)
        assert (dict(self.engine.groups), self.engine.block_manager.num_free_blocks) == before

    @rule(pick=st.integers(0, 10**6))
    def abort(self, pick: int) -> None:
        if self.expected:
            rid = sorted(self.expected)[pick % len(self.expected)]
            self.engine.abort_request(rid)
            del self.expected[rid], self.chosen[rid], self.calls[rid]
            self.ended.add(rid)

    @rule(steps=st.integers(1, 4))
    def step(self, steps: int) -> None:
        for _ in range(steps):
            if self.engine.has_unfinished_requests() and not self.engine.is_paused():
                self._step()

    @rule(mode=st.sampled_from(["abort", "wait", "keep"]), clear_cache=st.booleans())
    def pause(self, mode: str, clear_cache: bool) -> None:
        """Pausing a paused engine does nothing; otherwise abort and wait end every request."""
        was_paused = self.engine.is_paused()
        self._take(self.engine.pause_generation(mode=mode, clear_cache=clear_cache), aborted=mode == "abort")
        assert self.engine.is_paused() and self.engine._in_flight is None
        assert was_paused or mode == "keep" or not self.expected, sorted(self.expected)

    @rule()
    def reload_model(self) -> None:
        """M's own checkpoint written again: refused unless paused or idle, and changing nothing that the
        other oracles see (the requests kept go on, the prefix cache starts a new root)."""
        try:
            self.engine.load_weights(path=self.engine.config.model, role="model")
        except RastError as e:
            assert self.engine.has_unfinished_requests() and not self.engine.is_paused(), e

    @rule()
    def resume(self) -> None:
        self.engine.resume_generation()

    @rule(name=st.sampled_from(["c", "d"]))
    def unload(self, name: str) -> None:
        held = {n for r, n in self.chosen.items() if self.engine.groups[r].lora_pending is None}  # in a slot
        try:
            self.engine.unload_lora_adapter(name)
        except RastError as e:  # not loaded now, or held by a live request
            assert ("no LoRA adapter" in str(e)) if name not in held else ("used by live requests" in str(e))
        else:
            assert name not in held

    @invariant()
    def blocks_are_accounted(self) -> None:
        check_blocks(self.engine)

    @invariant()
    def requests_keep_their_adapters(self) -> None:
        """Loads, unloads and evictions never move or clear a slot a live request reads."""
        lora = self.engine.model_set.lora
        for rid, name in self.chosen.items():
            group = self.engine.groups[rid]
            if group.lora_pending is not None:  # waits for its adapter's load: no slot, no blocks yet
                assert group.lora_slot == -1 and not group.seqs[0].block_table, rid
                assert lora.pending[name] is group.lora_pending and name not in lora.paths, (rid, lora.pending)
            else:
                slot = group.lora_slot
                assert (slot == -1) if name is None else (lora.slots[slot] == name), (rid, name, lora.slots)
        waiting = [g for p in lora.pending.values() for g in p.groups]
        assert sorted(g.request_id for g in waiting) == sorted(
            r for r, g in self.engine.groups.items() if g.lora_pending is not None)

    @invariant()
    def queue_scans_pass_over_only_waiting_loads(self) -> None:
        """The scheduler's scans for a request to admit start at its _lead: every sequence before it waits for
        its adapter's load. The slots a load may evict are those no admitted request holds, though
        _lora_slots_held reads only the running sequences when they hold every slot that could be evicted."""
        sched, lora = self.engine.scheduler, self.engine.model_set.lora
        assert all(s.group.lora_pending is not None for s in itertools.islice(sched.waiting, sched._lead))
        held = {g.lora_slot for g in self.engine.groups.values() if g.lora_slot >= 0 and g.admitted}

        def evictable(held: set[int]) -> set[int]:
            return {s for s, n in enumerate(lora.slots) if n is not None and n not in lora.pinned and s not in held}
        assert evictable(self.engine._lora_slots_held()) == evictable(held)

    def teardown(self) -> None:
        self.engine.resume_generation()
        for _ in range(500):
            if not self.engine.has_unfinished_requests():
                break
            self._step()
            check_blocks(self.engine)
        assert not self.expected and not self.engine.has_unfinished_requests(), sorted(self.expected)
        assert self.engine.block_manager.num_free_blocks == BLOCKS and not self.engine.model_set.lora.pending


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_interleavings_keep_the_engine_consistent(qwen2_triple: tuple, name: str,
                                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    large, _, base = qwen2_triple
    root = tmp_path_factory.mktemp("fuzz-lora")
    modules = {"a": str(make_adapter(base, root / "a", seed=51)),
               "b": str(make_adapter(base, root / "b", seed=52, r=2, target_modules=["q_proj", "down_proj"]))}
    # loaded by path on first use, into the one slot left: each evicts the other when it is idle
    by_path = tuple(LoRARequest(n, i + 3, str(make_adapter(base, root / n, seed=53 + i, r=3)))
                    for i, n in enumerate("cd"))
    engine = LLMEngine(EngineConfig(str(large), small_base=str(base), lora_modules=modules, max_loras=3, lam=0.7,
                                    device="cpu", dtype="float32", block_size=BS, kv_cache_blocks=BLOCKS,
                                    max_num_seqs=4, max_model_len=MAX_LEN, seed=3, **CONFIGS[name]))
    machine = type(f"Machine_{name}", (EngineMachine,), dict(engine=engine, loras=(None, "a", "b", *by_path),
                                                                 seen=set(), waited=set()))
    machine.TestCase.settings = settings(max_examples=20, stateful_step_count=30, deadline=None,
                                         suppress_health_check=list(HealthCheck))
    machine.TestCase().runTest()
    stats = engine.stats()  # the runs reached what they are here for
    assert stats.num_preemptions_total > 0 and engine.block_manager.prefix_hits > 0, stats
    assert name != "speculative" or stats.spec_draft_tokens_total > 0
    assert machine.seen == {None, "a", "b", "c", "d"} and machine.waited, machine.waited
