"""async_scheduling: each decode step is launched before the previous step's ids reach the host, and the
device feeds those ids in (DecodeBuffers' token_src). The oracle is the synchronous engine (equal to HF
transformers by test_engine.py): seeded sampling gives the same tokens whatever the batch, so a token
lost, duplicated, read from the wrong row or kept past a stop shows. Each test also checks that the
engine ends clean, and drain() that no output ever shows a pending placeholder."""
from __future__ import annotations

import pytest

from rast_engine import SamplingParams
from rast_engine.block_manager import block_hash
from rast_engine.llm_engine import LLMEngine
from rast_engine.sequence import PENDING
from test_engine_lifecycle import TEXTS, alone, assert_clean, drain, encode, make_engine, run, summary


@pytest.fixture(scope="module")
def oracle(qwen2_triple: tuple) -> LLMEngine:
    return make_engine(qwen2_triple, blocks=256, caching=False, async_output=False)


def ahead_engine(triple: tuple, **kw: object) -> LLMEngine:
    engine = make_engine(triple, async_output=True, **kw)
    assert engine.async_scheduling  # on with async_output by default
    return engine


def count_ahead(engine: LLMEngine, prefills: bool = False) -> list[int]:
    """Record the size of every batch scheduled ahead (with ``prefills``: of every prefill batch)."""
    sizes: list[int] = []
    schedule_ahead = engine.scheduler.schedule_ahead

    def counted():  # noqa: ANN202
        out = schedule_ahead()
        if out is not None and (out.is_prefill or not prefills):
            sizes.append(len(out.seqs))
        return out

    engine.scheduler.schedule_ahead = counted
    return sizes


def mixed_requests(engine: LLMEngine, oracle: LLMEngine) -> dict:
    ids = [encode(engine, t) for t in TEXTS]
    free_text = alone(oracle, ids[0], SamplingParams(temperature=1.0, max_tokens=16, seed=5, ignore_eos=True))
    stop = free_text[0][1].split()[1]
    return {
        "stop": (ids[0], SamplingParams(temperature=1.0, max_tokens=16, seed=5, ignore_eos=True, stop=[stop])),
        "fork": (ids[1], SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=6, stop=[" the", "."])),
        "eos": (ids[2], SamplingParams(temperature=1.2, max_tokens=20, seed=7, stop_token_ids=[11, 17, 29])),
        "greedy": (ids[3], SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)),
        "short": (ids[3], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)),
    }


def test_steps_ahead_equal_the_synchronous_engine(qwen2_triple: tuple, oracle: LLMEngine) -> None:
    """Stop strings, stop tokens, forks, max_tokens of 1 and more: every sample equals the oracle's run
    alone, and all but the first decode step of the batch went ahead."""
    engine = ahead_engine(qwen2_triple)
    sizes = count_ahead(engine)
    requests = mixed_requests(engine, oracle)
    got = run(engine, requests)
    assert got["stop"][0][2] == "stop"
    for rid, (prompt, params) in requests.items():
        assert got[rid] == alone(oracle, prompt, params), rid
    assert len(sizes) >= 15 and max(sizes) == 6  # stop, 3 forks, eos, greedy decoding at once
    assert_clean(engine)


def test_ahead_steps_take_their_input_from_the_device(qwen2_triple: tuple, oracle: LLMEngine,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An ahead step's input ids exist only on the device: staging holds 0 for them. Without the stored
    sampled ids the tokens change, so the feed is what carries them."""
    engine = ahead_engine(qwen2_triple)
    sizes = count_ahead(engine)
    prompt = encode(engine, TEXTS[1])
    params = SamplingParams(temperature=0.9, max_tokens=10, seed=8, ignore_eos=True)
    engine.add_request("r", prompt, params)
    for _ in range(3):
        engine.step()
    seq = engine.groups["r"].seqs[0]
    assert seq.num_pending == 1 and seq.token_ids[-1] == PENDING and engine._in_flight.holds_pending
    assert int(engine.runner.buffers.host["i64"][0, 0]) == 0  # the input id row of the batch ahead
    assert drain(engine)["r"] == alone(oracle, prompt, params)
    # token 1 from the prefill; 2..10 from decode steps launched ahead (the first fed by the prefill's
    # sampled ids); none past max_tokens
    assert sizes == [1] * 9
    broken = ahead_engine(qwen2_triple)
    monkeypatch.setattr(broken.runner.buffers, "store_sampled", lambda ids: None)
    assert run(broken, {"r": (prompt, params)})["r"] != alone(oracle, prompt, params)


def test_preemption_falls_back_to_waiting_and_admission_goes_ahead(qwen2_triple: tuple, oracle: LLMEngine) -> None:
    """A KV cache too small for every slot makes the next batch wait for the ids (the host must know them
    to recompute a preempted sequence); a request arriving mid-run is admitted by a prefill launched
    ahead, the running sequences riding along. Outputs stay the oracle's."""
    tight = ahead_engine(qwen2_triple, blocks=12)
    sizes = count_ahead(tight)
    prefills = count_ahead(tight, prefills=True)
    prompts = [encode(tight, t) for t in TEXTS[:3]]
    requests = {
        "greedy": (prompts[0], SamplingParams(n=2, temperature=0.0, max_tokens=14, ignore_eos=True, stop=["zz"])),
        "seeded": (prompts[1], SamplingParams(n=3, temperature=1.0, top_k=30, max_tokens=12, seed=9, stop=[" a"])),
    }
    for rid, (ids, params) in requests.items():
        tight.add_request(rid, ids, params)
    for _ in range(4):
        tight.step()
    late = (prompts[2], SamplingParams(temperature=0.8, max_tokens=10, seed=4, ignore_eos=True))
    requests["late"] = late
    got = run(tight, {"late": late})  # drains every request: none finished in the first 4 steps
    assert tight.scheduler.num_preemptions > 0 and sizes and prefills
    for rid, (ids, params) in requests.items():
        assert got[rid] == alone(oracle, ids, params), rid
    assert_clean(tight)


def test_requests_waiting_for_a_slot_do_not_stop_steps_ahead(qwen2_triple: tuple, oracle: LLMEngine) -> None:
    """An evaluation run submits more requests than max_num_seqs, so the queue is never empty. While
    its head cannot be admitted (no free slot) decode steps still go ahead; a freed slot admits it by
    a prefill launched ahead. Every request equals its run alone."""
    engine = ahead_engine(qwen2_triple, max_num_seqs=2)
    prefills = count_ahead(engine, prefills=True)
    waiting_at_ahead: list[int] = []
    schedule_ahead = engine.scheduler.schedule_ahead

    def recorded():  # noqa: ANN202
        out = schedule_ahead()
        if out is not None:
            waiting_at_ahead.append(len(engine.scheduler.waiting))
        return out

    engine.scheduler.schedule_ahead = recorded
    ids = [encode(engine, t) for t in TEXTS]
    requests = {f"r{i}": (ids[i], SamplingParams(temperature=1.0, max_tokens=6 + 3 * i, seed=i, ignore_eos=True))
                for i in range(4)}
    got = run(engine, requests)
    for rid, (prompt, params) in requests.items():
        assert got[rid] == alone(oracle, prompt, params), rid
    assert sum(n > 0 for n in waiting_at_ahead) >= 6  # r0's and r1's decodes, r2 and r3 queued
    assert prefills == [2, 2]  # r2 then r3 admitted, each with the other running sequence riding along
    assert_clean(engine)


@pytest.mark.parametrize("budget", [None, 8])
def test_prefills_with_riders_feed_the_step_ahead(qwen2_triple: tuple, oracle: LLMEngine, budget) -> None:  # noqa: ANN001
    """A request admitted mid-run is prefilled, in a step launched ahead, with the running ones riding
    along (one token each, their input ids fed on the device), and the decode step after that batch
    goes ahead too, fed by its sampled ids in draw order; with a budget of 8 tokens the prompt is
    prefilled in chunks, and a chunk that samples nothing stops the run ahead until the last one."""
    engine = ahead_engine(qwen2_triple, max_num_batched_tokens=budget)
    sizes = count_ahead(engine)
    prefills = count_ahead(engine, prefills=True)
    ids = [encode(engine, t) for t in TEXTS]
    requests = {
        "a": (ids[0], SamplingParams(temperature=0.9, max_tokens=14, seed=1, ignore_eos=True)),
        "b": (ids[1], SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)),
    }
    late = {"late": (ids[2] + ids[3], SamplingParams(temperature=1.1, max_tokens=6, seed=2, ignore_eos=True))}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    for _ in range(4):
        engine.step()
    got = run(engine, late)
    for rid, (prompt, params) in (requests | late).items():
        assert got[rid] == alone(oracle, prompt, params), rid
    assert 3 in sizes  # the admitted request decodes with the others in steps launched ahead
    # its prefill (or first chunk) with the two running sequences riding along; with a budget of 8 "b"
    # waits for the tokens "a"'s chunks leave, and is admitted ahead of a step too, "a" riding along
    assert prefills == ([3] if budget is None else [2, 3])
    assert_clean(engine)


def test_logprobs_are_computed_on_the_device_and_go_ahead(qwen2_triple: tuple, oracle: LLMEngine) -> None:
    """Logprobs are computed on the device with the step and read with its ids, so such a batch goes
    ahead like any other; outputs (logprobs included) equal the synchronous engine's."""
    engine = ahead_engine(qwen2_triple)
    sizes = count_ahead(engine)
    prompt = encode(engine, TEXTS[2])
    params = SamplingParams(temperature=0.7, max_tokens=6, seed=1, logprobs=2, ignore_eos=True)
    engine.add_request("lp", prompt, params)
    out = None
    while engine.has_unfinished_requests():
        out = engine.step() or out
    oracle.add_request("lp", prompt, params)
    ref = None
    while oracle.has_unfinished_requests():
        ref = oracle.step() or ref
    assert out[0].outputs[0].logprobs == ref[0].outputs[0].logprobs and len(out[0].outputs[0].logprobs) == 6
    assert out[0].outputs[0].cumulative_logprob == ref[0].outputs[0].cumulative_logprob
    assert sizes == [1] * 5  # tokens 2..6
    assert_clean(engine)


def test_blocks_computed_ahead_are_hashed_once_their_ids_are_known(qwen2_triple: tuple, oracle: LLMEngine) -> None:
    """Prefix caching over tokens generated ahead: every hashed block holds real ids and its hash is the
    chained hash of them, and a prompt extending a finished output reuses its blocks with the oracle's
    result."""
    engine = ahead_engine(qwen2_triple)
    prompt = encode(engine, TEXTS[0])
    first = SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True)
    engine.add_request("a", prompt, first)
    for _ in range(6):
        engine.step()
        for seq in engine.groups["a"].seqs:
            parent = b""
            for i, h in enumerate(seq.block_hashes):
                block = seq.token_ids[i * engine.config.block_size:(i + 1) * engine.config.block_size]
                assert PENDING not in block and h == block_hash(parent, block)
                parent = h
    tokens = drain(engine)["a"][0][0]
    hits = engine.block_manager.prefix_hits
    longer, follow = prompt + tokens, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    assert run(engine, {"b": (longer, follow)})["b"] == alone(oracle, longer, follow)
    assert engine.block_manager.prefix_hits - hits >= (len(longer) - 1) // engine.config.block_size
    assert_clean(engine)


@pytest.mark.parametrize("seed", range(12))
def test_random_traffic_equals_each_request_run_alone(qwen2_triple: tuple, oracle: LLMEngine, seed: int) -> None:
    """Random requests (n, temperature, top-k/p, stops, max_tokens, logprobs, λ, logit_bias, min_tokens,
    penalties) arriving at random steps into a 48-slot KV cache (preemptions in most seeds) with a small
    token budget (chunked prompts), two aborted on the way: every other request gets exactly what it gets
    alone in the synchronous engine. (300 seeds passed when this was written, 200 more with the logit
    adjustments; CI runs 12.)"""
    import random

    rng = random.Random(seed)
    engine = ahead_engine(qwen2_triple, blocks=12, max_num_batched_tokens=rng.choice([8, 16, None]))
    prompts = [encode(engine, t) for t in TEXTS]
    arrivals: list[tuple[int, str, list[int], SamplingParams]] = []
    for i in range(7):
        max_tokens = rng.randrange(1, 24)
        params = SamplingParams(
            n=rng.choice([1, 1, 2]), temperature=rng.choice([0.0, 0.7, 1.2]), top_k=rng.choice([0, 20]),
            top_p=rng.choice([1.0, 0.9]), max_tokens=max_tokens, seed=rng.randrange(100),
            stop=rng.choice([None, [" the"], ["a", "."]]), stop_token_ids=rng.choice([[], [rng.randrange(100)]]),
            logprobs=rng.choice([None, None, 2]), lam=rng.choice([None, 0.3]),
            logit_bias=rng.choice([None, None, {rng.randrange(100): rng.choice([-100.0, 3.0])}]),
            min_tokens=min(rng.choice([0, 0, 1, 5]), max_tokens), repetition_penalty=rng.choice([1.0, 1.0, 1.0, 1.4]),
            presence_penalty=rng.choice([0.0, 0.0, 0.0, 0.5]))
        prompt = rng.choice(prompts)[:rng.randrange(3, 12)]
        arrivals.append((rng.randrange(8), f"q{i}", prompt, params))
    aborted = {rid for _, rid, _, _ in rng.sample(arrivals, 2)}
    done: dict[str, list] = {}
    step = 0
    while step < 300 and (engine.has_unfinished_requests() or any(a[0] >= step for a in arrivals)):
        for at, rid, prompt, params in arrivals:
            if at == step:
                engine.add_request(rid, prompt, params)
            if rid in aborted and at + 3 == step:
                engine.abort_request(rid)
        for out in engine.step():
            assert all(t >= 0 for c in out.outputs for t in c.token_ids), out
            if out.finished:
                done[out.request_id] = summary(out)
        step += 1
    for _, rid, prompt, params in arrivals:
        if rid not in aborted:
            assert done[rid] == alone(oracle, prompt, params), rid
    assert_clean(engine)
