"""Chunked prefill: a prompt longer than max_num_batched_tokens is prefilled over several steps.

Oracles: HF transformers' Eq. 3 greedy loop (test_engine.hf_greedy) and the same engine with a budget that
holds every prompt whole. Seeded sampling promises the same tokens whatever the batch, so chunking, forks,
prefix-cache hits, preemption, aborts and failed steps must not change a single token, and every block
must be free at the end (test_engine_lifecycle.assert_clean).
"""
from __future__ import annotations

import pytest
import torch
from test_engine import hf_greedy
from test_engine_lifecycle import assert_clean, drain, run

from rast_engine import EngineConfig, LLMEngine, SamplingParams
from rast_engine.sequence import SequenceStatus

LAM = 0.7
BS = 4
BUDGET = 5  # tokens per prefill step: every prompt here is cut into several chunks
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def make_engine(triple: tuple, budget: int | None = BUDGET, blocks: int = 96, caching: bool = True) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(triple[0]), small_rl=str(triple[1]), small_base=str(triple[2]),
                                  lam=LAM, block_size=BS, kv_cache_blocks=blocks, enable_prefix_caching=caching,
                                  max_num_batched_tokens=budget, seed=5))


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 100, (n,), generator=g).tolist() for n in lengths]


def record_steps(engine: LLMEngine) -> list[tuple[bool, int]]:
    """(is_prefill, tokens the models actually ran on) of every forward from now on."""
    log: list[tuple[bool, int]] = []
    forward = engine.runner.forward_logits

    def logged(inputs, rows, outs=None):  # noqa: ANN001, ANN202
        log.append((inputs.meta.is_prefill, inputs.input_ids.shape[0]))
        return forward(inputs, rows, outs)

    engine.runner.forward_logits = logged
    return log


@pytest.fixture(scope="module")
def whole(qwen2_triple: tuple) -> LLMEngine:
    """The unchunked oracle: its default budget holds every prompt in one step; no prefix caching."""
    return make_engine(qwen2_triple, budget=None, blocks=256, caching=False)


# olmo3: chunks longer than its 4-token window; qwen3_moe: experts over chunks of several tokens
@pytest.mark.parametrize("arch", ["qwen2", "llama", "olmo3", "qwen3_moe"])
def test_chunked_greedy_equals_unchunked_and_hf(arch: str, request: pytest.FixtureRequest) -> None:
    triple = request.getfixturevalue(f"{arch}_triple")
    chunked, unchunked = make_engine(triple), make_engine(triple, budget=None)
    ids = prompts([21, 26, 23])
    reqs = {f"r{i}": (p, GREEDY) for i, p in enumerate(ids)}
    log = record_steps(chunked)
    got = run(chunked, reqs)
    assert got == run(unchunked, reqs)
    prefills = [t for is_prefill, t in log if is_prefill]
    assert max(prefills) <= BUDGET and len(prefills) >= sum(len(p) for p in ids) // BUDGET
    for i, p in enumerate(ids):
        assert got[f"r{i}"][0][0] == hf_greedy(triple, p, LAM, chunked.vocab_size, GREEDY.max_tokens)
    assert_clean(chunked)


def test_forks_and_prefix_cache_share_blocks_under_chunking(qwen2_triple: tuple, whole: LLMEngine) -> None:
    engine = make_engine(qwen2_triple)
    prompt = prompts([21], seed=1)[0]  # 4 chunks, then its last token in a decode step that forks
    fork = SamplingParams(n=3, temperature=1.0, top_k=30, max_tokens=6, seed=8, ignore_eos=True)
    engine.add_request("fork", prompt, fork)
    chunks = 0
    while not engine.groups["fork"].forked:
        outs = engine.step()
        chunks += 1
        seq = engine.groups["fork"].seqs[0]
        if not engine.groups["fork"].forked:  # mid-prefill: no token, blocks for the whole prompt held
            assert outs == [] and seq.num_generated == 0 and 0 < seq.num_computed_tokens < len(prompt)
            assert len(seq.block_table) == -(-len(prompt) // BS)
    assert chunks == -(-len(prompt) // BUDGET)
    seqs = engine.groups["fork"].seqs
    assert len(seqs) == 3 and all(s.block_table == seqs[0].block_table for s in seqs)
    assert all(engine.block_manager.ref_counts[b] == 3 for b in seqs[0].block_table)
    got = drain(engine)
    assert got["fork"] == run(whole, {"ref": (prompt, fork)})["ref"]
    assert len({tuple(t) for t, _, _ in got["fork"]}) > 1
    # the chunks registered the prompt's full blocks: a longer prompt reuses them, and its output holds
    longer = prompt + prompts([9], seed=2)[0]
    hits = engine.block_manager.prefix_hits
    again = run(engine, {"longer": (longer, GREEDY)})
    assert engine.block_manager.prefix_hits - hits == len(prompt) // BS
    assert again["longer"] == run(whole, {"ref": (longer, GREEDY)})["ref"]
    assert_clean(engine)


def test_preemption_recomputes_in_chunks_with_the_same_output(qwen2_triple: tuple, whole: LLMEngine) -> None:
    tight = make_engine(qwen2_triple, blocks=12)  # 48 slots for three sequences growing to ~36 tokens
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    reqs = {f"r{i}": (p, params) for i, p in enumerate(prompts([21, 24, 22], seed=3))}
    log = record_steps(tight)
    got = run(tight, reqs)
    assert tight.scheduler.num_preemptions > 0
    assert max(t for is_prefill, t in log if is_prefill) <= BUDGET  # recomputes were chunked too
    for rid, (p, _) in reqs.items():
        assert got[rid] == run(whole, {"ref": (p, params)})["ref"], rid
    assert_clean(tight)


def test_abort_of_a_half_prefilled_request_frees_its_blocks(qwen2_triple: tuple, whole: LLMEngine) -> None:
    engine = make_engine(qwen2_triple)
    prompt = prompts([23], seed=4)[0]
    engine.add_request("half", prompt, SamplingParams(n=2, temperature=1.0, max_tokens=5, seed=2))
    assert engine.step() == [] and engine.step() == []
    seq = engine.groups["half"].seqs[0]
    assert seq.status is SequenceStatus.RUNNING and seq.num_computed_tokens == 2 * BUDGET
    assert engine.block_manager.num_used_blocks == -(-len(prompt) // BS)
    engine.abort_request("half")
    assert_clean(engine)
    probe = SamplingParams(temperature=0.8, max_tokens=6, seed=3, ignore_eos=True)
    assert run(engine, {"probe": (prompt, probe)}) == {"probe": run(whole, {"ref": (prompt, probe)})["ref"]}
    assert_clean(engine)


def test_failed_chunk_is_requeued_and_recomputed(qwen2_triple: tuple, whole: LLMEngine,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(qwen2_triple)
    prompt = prompts([20], seed=5)[0]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=5, seed=6, ignore_eos=True)
    engine.add_request("a", prompt, params)
    engine.step()  # the first chunk is computed
    monkeypatch.setattr(engine.runner, "forward_logits", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("injected failure")))
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    monkeypatch.undo()
    seq = engine.groups["a"].seqs[0]
    assert seq.status is SequenceStatus.WAITING and seq.block_table == [] and seq.num_computed_tokens == 0
    assert drain(engine) == {"a": run(whole, {"ref": (prompt, params)})["ref"]}
    assert_clean(engine)


def test_arriving_prompt_does_not_stall_running_requests(qwen2_triple: tuple, whole: LLMEngine) -> None:
    """A long prompt arriving while r0 decodes is prefilled in chunks over several steps, and r0 takes a
    token in every one of them (it rides along in the prefill steps); both outputs stay the oracle's."""
    engine = make_engine(qwen2_triple)
    first, late = prompts([6, 23], seed=8)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=4, ignore_eos=True)
    engine.add_request("r0", first, params)
    while not engine.groups["r0"].forked:
        engine.step()
    engine.add_request("late", late, params)
    left = params.max_tokens - engine.groups["r0"].seqs[0].num_generated
    steps, got = 0, {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += "r0" not in got
        for out in outs:
            if out.finished:
                got[out.request_id] = [(c.token_ids, c.text, c.finish_reason) for c in out.outputs]
    assert steps == left  # one token per step, prefill steps included
    assert len(late) > 2 * BUDGET  # so "late" took several prefill steps while r0 decoded
    for rid, p in (("r0", first), ("late", late)):
        assert got[rid] == run(whole, {"ref": (p, params)})["ref"], rid
    assert_clean(engine)
