"""The request lifecycle under stress: preemption of forks sharing copy-on-write prompt blocks with prefix
caching, aborts at every stage, prefix-cache edges, failing steps, and scoring between generation steps
(length limits and stop conditions: test_stop_rules.py).

The oracle is the same engine unconstrained (roomy KV cache, no prefix caching, one request alone);
test_engine.py shows it equals HF transformers, and seeded sampling promises the same tokens whatever the
batch, cache or preemptions, so a lost, duplicated or altered token shows. Every test also checks that
the engine ends clean: no request, every block free at reference count 0, the prefix-cache maps agreeing.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rast_engine import LLM, EngineConfig, LLMEngine, SamplingParams
from rast_engine.errors import RastError
from rast_engine.outputs import RequestOutput
from rast_engine.sequence import SequenceStatus

LAM = 0.7
BS = 4
TEXTS = ["the cat sat on the mat and", "the cat sat on the mat and the dog", "3 + 5 = 8. 3 * 5",
         "what is the answer? let us"]


def make_engine(triple: tuple, blocks: int = 128, caching: bool = True, **kw: object) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(triple[0]), small_rl=str(triple[1]), small_base=str(triple[2]),
                                  lam=LAM, block_size=BS, kv_cache_blocks=blocks, enable_prefix_caching=caching,
                                  seed=3, **kw))


@pytest.fixture(scope="module")
def oracle(qwen2_triple: tuple) -> LLMEngine:
    return make_engine(qwen2_triple, blocks=256, caching=False)


def summary(out: RequestOutput) -> list[tuple[list[int], str, str]]:
    return [(c.token_ids, c.text, c.finish_reason) for c in out.outputs]


def drain(engine: LLMEngine, limit: int = 500) -> dict[str, list]:
    """Step until no request is left; the final summary of every request that finished. Every output on
    the way holds real token ids only (never a pending placeholder, see sequence.py)."""
    done: dict[str, list] = {}
    for _ in range(limit):
        if not engine.has_unfinished_requests():
            return done
        for out in engine.step():
            assert all(t >= 0 for c in out.outputs for t in c.token_ids), out
            if out.finished:
                assert out.request_id not in done, "a request finished twice"
                done[out.request_id] = summary(out)
    raise AssertionError("the engine did not finish its requests")


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    return drain(engine)


def fail(monkeypatch: pytest.MonkeyPatch, target: object, name: str) -> None:
    """Make ``target.name`` raise (undo with monkeypatch.undo())."""
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(target, name, boom)


def alone(oracle: LLMEngine, ids: list[int], params: SamplingParams) -> list:
    return run(oracle, {"ref": (ids, params)})["ref"]


def assert_clean(engine: LLMEngine) -> None:
    bm, sched = engine.block_manager, engine.scheduler
    assert not engine.groups and not sched.running and not sched.waiting
    assert all(r == 0 for r in bm.ref_counts), "a block is still referenced"
    assert bm.num_free_blocks == bm.num_blocks and len(set(bm.free_list)) == bm.num_blocks
    assert {b: h for h, b in bm.cached.items()} == bm.hash_of, "the prefix cache maps disagree"


def encode(engine: LLMEngine, text: str) -> list[int]:
    return list(engine.tokenizer.encode(text))


# ---- preemption of forks sharing prompt blocks, with prefix caching -------------------------------------
def test_preemption_of_forks_with_prefix_cache_keeps_outputs(qwen2_triple: tuple, oracle: LLMEngine) -> None:
    tight = make_engine(qwen2_triple, blocks=12)  # 48 slots for ~130 tokens of live sequences
    prompts = [encode(tight, t) for t in TEXTS[:3]]
    assert prompts[1][:len(prompts[0]) - 2] == prompts[0][:-2]  # a shared prefix for the cache
    requests = {
        "greedy": (prompts[0], SamplingParams(n=2, temperature=0.0, max_tokens=14, ignore_eos=True)),
        "seeded": (prompts[1], SamplingParams(n=3, temperature=1.0, top_k=30, max_tokens=12, seed=9,
                                              ignore_eos=True)),
        "single": (prompts[2], SamplingParams(temperature=0.8, max_tokens=10, seed=4, ignore_eos=True)),
    }
    got = run(tight, requests)
    assert tight.scheduler.num_preemptions > 0 and tight.block_manager.prefix_hits > 0
    for rid, (ids, params) in requests.items():
        assert got[rid] == alone(oracle, ids, params), rid
    assert len({tuple(t) for t, _, _ in got["seeded"]}) > 1  # the samples differ: they are not one row
    assert_clean(tight)


# ---- abort at every stage ---------------------------------------------------------------------------
def test_abort_at_every_stage_frees_everything(qwen2_triple: tuple, oracle: LLMEngine,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(qwen2_triple, blocks=10)
    ids = encode(engine, TEXTS[0])
    fork = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=1, ignore_eos=True)
    probe = SamplingParams(temperature=1.0, max_tokens=6, seed=2, ignore_eos=True)
    expected = alone(oracle, ids, probe)

    def check_then_probe() -> None:
        assert_clean(engine)
        assert run(engine, {"probe": (ids, probe)})["probe"] == expected
        assert_clean(engine)

    engine.add_request("w", ids, fork)  # waiting
    engine.abort_request("w")
    check_then_probe()
    engine.add_request("p", ids, fork)  # mid-prefill: the step took its blocks, then the forward failed
    fail(monkeypatch, engine.runner, "forward_logits")
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    monkeypatch.undo()
    engine.abort_request("p")
    check_then_probe()
    engine.add_request("f", ids, fork)  # prefilled and forked into 3 samples sharing the prompt blocks
    engine.step()
    assert len(engine.groups["f"].seqs) == 3
    engine.abort_request("f")
    check_then_probe()
    engine.add_request("d", ids, fork)  # mid-decode, then preempted: some samples wait, some run
    for _ in range(12):
        engine.step()
        if any(s.status is SequenceStatus.WAITING for s in engine.groups["d"].seqs):
            break
    assert {s.status for s in engine.groups["d"].seqs} == {SequenceStatus.WAITING, SequenceStatus.RUNNING}
    engine.abort_request("d")
    check_then_probe()
    engine.add_request("x", ids, SamplingParams(n=2, temperature=0.0, max_tokens=2, ignore_eos=True))
    drain(engine)
    engine.abort_request("x")  # after it finished: nothing left to do, and no error
    engine.abort_request("x")
    check_then_probe()


def test_abort_one_request_leaves_the_others_unchanged(qwen2_triple: tuple, oracle: LLMEngine) -> None:
    engine = make_engine(qwen2_triple, blocks=12)
    ids = [encode(engine, t) for t in TEXTS[:2]]
    keep = SamplingParams(n=2, temperature=1.0, max_tokens=10, seed=5, ignore_eos=True)
    engine.add_request("keep", ids[0], keep)
    engine.add_request("drop", ids[1], SamplingParams(n=2, temperature=1.0, max_tokens=10, seed=6, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.abort_request("drop")
    final = drain(engine)
    assert final == {"keep": alone(oracle, ids[0], keep)}
    assert_clean(engine)


# ---- prefix-cache edges ---------------------------------------------------------------------------
def test_prefix_cache_at_block_boundary_and_same_step_duplicates(qwen2_triple: tuple, oracle: LLMEngine) -> None:
    engine = make_engine(qwen2_triple, blocks=64)
    ids = encode(engine, TEXTS[1])
    exact = ids[:2 * BS]  # the cached prefix ends exactly at a block boundary
    longer = exact + ids[2 * BS:2 * BS + 3]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    seeded = SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=8, ignore_eos=True)
    want = {name: alone(oracle, p, s) for name, p, s in
            (("exact", exact, greedy), ("longer", longer, greedy), ("seeded", exact, seeded))}
    assert run(engine, {"a": (exact, greedy)})["a"] == want["exact"]
    hits = engine.block_manager.prefix_hits
    assert run(engine, {"b": (exact, greedy)})["b"] == want["exact"]  # all full hits: the last recomputed
    assert engine.block_manager.prefix_hits - hits == 1
    hits = engine.block_manager.prefix_hits
    assert run(engine, {"c": (longer, greedy)})["c"] == want["longer"]
    assert engine.block_manager.prefix_hits - hits == 2
    # the same prompt twice in one step (nothing cached yet for the tail), and again while they run
    fresh = make_engine(qwen2_triple, blocks=64)
    for rid in ("d1", "d2"):
        fresh.add_request(rid, exact, seeded)
    out = fresh.step()
    assert len(out) == 2
    fresh.add_request("d3", exact, seeded)
    assert drain(fresh) == {"d1": want["seeded"], "d2": want["seeded"], "d3": want["seeded"]}
    assert fresh.block_manager.prefix_hits >= 1
    assert_clean(engine)
    assert_clean(fresh)


# ---- a step that raises ------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["forward_logits", "sample", "decode", "copy_blocks"])
def test_failed_step_leaves_the_engine_consistent(qwen2_triple: tuple, oracle: LLMEngine,
                                                  monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A step that raises in the runner (the forward or the sampler of a prefill, the decode step, or the
    copy-on-write copies) changes no sequence: stepping on gives the outputs of a run that never failed."""
    engine = make_engine(qwen2_triple, blocks=64)
    ids = [encode(engine, t) for t in TEXTS[:2]]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=12, ignore_eos=True)
    engine.add_request("a", ids[0], params)
    engine.add_request("b", ids[1], params)
    if where not in ("forward_logits", "sample"):
        engine.step()  # both prefilled and forked: the failing step decodes them all
        # the failing decode must copy each request's shared last block before writing to it
        assert engine.block_manager.ref_counts[engine.groups["a"].seqs[0].block_table[-1]] == 2
    fail(monkeypatch, engine.kv if where == "copy_blocks" else engine.runner, where)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    monkeypatch.undo()
    assert drain(engine) == {"a": alone(oracle, ids[0], params), "b": alone(oracle, ids[1], params)}
    assert_clean(engine)


def test_generate_interrupted_leaves_no_request_behind(qwen2_triple: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = LLM(*map(str, qwen2_triple), lam=LAM, block_size=BS, kv_cache_blocks=64)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    want = llm.generate(TEXTS[:2], params, use_tqdm=False)
    real = engine.step

    def interrupted() -> list:  # Ctrl-C once the requests hold blocks
        if not engine.scheduler.waiting:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(TEXTS[:3], params, use_tqdm=False)
    monkeypatch.undo()
    assert not engine.has_unfinished_requests()  # the abandoned requests were aborted
    assert_clean(engine)
    again = llm.generate(TEXTS[:2], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in want]
    assert_clean(engine)


def test_a_rejected_batch_leaves_the_next_outputs_as_they_were(qwen2_triple: tuple, tmp_path: Path) -> None:
    """A batch whose last prompt is refused is admitted not at all, and the seeds its first requests drew
    are drawn again: the next unseeded outputs equal a fresh LLM's (found by a review). A generation
    config directory may be given as a Path, as the model paths may."""
    kw = dict(lam=LAM, block_size=BS, kv_cache_blocks=64)
    params = SamplingParams(temperature=1.0, max_tokens=6)
    want = LLM(*map(str, qwen2_triple), **kw).generate(TEXTS[:2], params, use_tqdm=False)
    llm = LLM(*map(str, qwen2_triple), **kw)
    with pytest.raises(RastError):
        llm.generate([*TEXTS[:2], [5] * 5000], params, use_tqdm=False)  # past max_model_len
    assert_clean(llm.llm_engine)
    got = llm.generate(TEXTS[:2], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert LLM(*map(str, qwen2_triple), generation_config=Path(qwen2_triple[0]), **kw).llm_engine.config.generation_config \
        == str(qwen2_triple[0])


# ---- scoring between generation steps ------------------------------------------------------------------
def test_score_between_generation_steps(qwen2_triple: tuple, oracle: LLMEngine) -> None:
    engine = make_engine(qwen2_triple, blocks=16)
    ids = [encode(engine, t) for t in TEXTS]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=21, ignore_eos=True)
    engine.add_request("g0", ids[0], params)
    engine.step()
    engine.add_request("g1", ids[1], params)  # pending: admitted by a later step
    scores = engine.score([ids[2], ids[3]], output="logprobs")
    ref = oracle.score([ids[2], ids[3]], output="logprobs")
    for s, r in zip(scores, ref):
        torch.testing.assert_close(s.combined, r.combined, atol=1e-5, rtol=0)
    used = engine.block_manager.num_used_blocks
    with pytest.raises(RastError, match="not enough free KV blocks"):
        engine.score([ids[0] * 4], output="logits")  # more blocks than the running request leaves free
    assert engine.block_manager.num_used_blocks == used
    assert drain(engine) == {"g0": alone(oracle, ids[0], params), "g1": alone(oracle, ids[1], params)}
    assert_clean(engine)


@pytest.mark.parametrize("ahead", [False, True])
def test_prompt_tokens_count_prefilled_prompts_once(qwen2_triple: tuple, ahead: bool) -> None:
    """EngineStats' prompt tokens (the server's rast_prompt_tokens_total) count a prompt when its prefill
    gives its first token: a request aborted in the queue counted too, and a recompute or n samples must
    not count it again."""
    kw = dict(async_output=True, async_scheduling=True) if ahead else {}
    engine = make_engine(qwen2_triple, blocks=14, caching=False, max_num_seqs=4, **kw)
    prompts = [list(range(5, 5 + n)) for n in (9, 11, 13)]
    engine.add_request("never", prompts[0], SamplingParams(max_tokens=4))
    engine.abort_request("never")
    assert engine.stats().prompt_tokens_total == 0
    params = SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=12, ignore_eos=True)
    run(engine, {"a": (prompts[1], params), "b": (prompts[2], params)})
    assert engine.scheduler.num_preemptions > 0  # samples recomputed their prompts
    assert engine.stats().prompt_tokens_total == len(prompts[1]) + len(prompts[2])
    assert engine.stats().generation_tokens_total == 2 * 2 * 12
