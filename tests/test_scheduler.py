"""Scheduler: continuous batching limits, preemption by recompute, stop conditions. No model runs here:
a deterministic stand-in "sampler" (token = f(sequence tokens)) makes any lost or altered token visible."""
from __future__ import annotations

from rast_engine.block_manager import BlockManager
from rast_engine.sampling_params import SamplingParams
from rast_engine.scheduler import Scheduler
from rast_engine.sequence import Sequence, SequenceGroup

BS = 4
EOS = 2


def make_seq(tokens: list[int], params: SamplingParams | None = None, rid: str = "r") -> Sequence:
    params = params or SamplingParams(max_tokens=4)
    group = SequenceGroup(request_id=rid, prompt=None, prompt_token_ids=list(tokens), params=params,
                          request_seed=0, arrival=0, weights=[])
    group.forked = params.n == 1  # n == 1: nothing to fork
    seq = Sequence(group=group, index=0, token_ids=list(tokens), seed=0)
    group.seqs.append(seq)
    return seq


def make_scheduler(num_blocks: int, max_num_seqs: int = 8, budget: int = 64, max_len: int = 64) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS), max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                     max_model_len=max_len, eos_token_ids=[EOS])


def fake_token(seq: Sequence) -> int:
    return 10 + sum(seq.token_ids) % 50  # depends only on the sequence's own tokens


def run_step(sched: Scheduler, log: list) -> None:
    out = sched.schedule()
    assert out is not None
    log.append((out.is_prefill, [s.group.request_id for s in out.seqs]))
    for seq in out.seqs:
        # the runner's invariants: prefill computes the uncomputed tail, decode exactly one token
        if not out.is_prefill:
            assert seq.num_computed_tokens == len(seq.token_ids) - 1
        assert len(seq.block_table) * BS >= len(seq.token_ids)
        seq.num_computed_tokens = len(seq.token_ids)
        sched.bm.register_computed(seq)
        seq.token_ids.append(fake_token(seq))
        reason = sched.stops.check(seq, 0)
        if reason:
            sched.finish(seq, reason)


def expected(prompt: list[int], max_tokens: int) -> list[int]:
    toks = list(prompt)
    for _ in range(max_tokens):
        toks.append(10 + sum(toks) % 50)
    return toks


def test_prefill_first_then_decode_within_limits() -> None:
    sched = make_scheduler(num_blocks=64, max_num_seqs=2, budget=10)
    seqs = [make_seq([3 + i] * 4, rid=f"r{i}") for i in range(3)]
    for s in seqs:
        sched.add(s)
    log: list = []
    while sched.has_unfinished():
        run_step(sched, log)
    assert log[0] == (True, ["r0", "r1"])  # max_num_seqs stops the third
    assert all(len(ids) <= 2 for _, ids in log)
    assert log[1] == (False, ["r0", "r1"])
    assert (True, ["r2"]) in log  # admitted as soon as a slot frees
    for i, s in enumerate(seqs):
        assert s.token_ids == expected([3 + i] * 4, 4) and s.finish_reason == "length"
    assert sched.bm.num_used_blocks == 0


def test_token_budget_splits_prefills() -> None:
    sched = make_scheduler(num_blocks=64, budget=10)
    for i in range(3):
        sched.add(make_seq([5] * 6, rid=f"r{i}"))
    out = sched.schedule()
    assert out.is_prefill and [s.group.request_id for s in out.seqs] == ["r0"]
    assert out.num_batched_tokens == 6


def test_preemption_by_recompute_keeps_every_token() -> None:
    # 6 blocks of 4; three sequences that each grow to 12 tokens (3 blocks) cannot all stay resident
    sched = make_scheduler(num_blocks=6)
    seqs = [make_seq([7 + i, 1, 1, 1], SamplingParams(max_tokens=8), rid=f"r{i}") for i in range(3)]
    for s in seqs:
        sched.add(s)
    log: list = []
    for _ in range(200):
        if not sched.has_unfinished():
            break
        run_step(sched, log)
    assert not sched.has_unfinished()
    assert sched.num_preemptions > 0
    for i, s in enumerate(seqs):
        assert s.token_ids == expected([7 + i, 1, 1, 1], 8) and s.finish_reason == "length"
    assert sched.bm.num_used_blocks == 0 and sched.bm.ref_counts == [0] * 6


def test_preempted_sequence_returns_to_the_front() -> None:
    sched = make_scheduler(num_blocks=2)
    a, b = make_seq([1, 1, 1], rid="a"), make_seq([3, 3, 3], rid="b")
    sched.add(a)
    sched.add(b)
    log: list = []
    run_step(sched, log)  # both prefilled: one block each; each now has 4 tokens
    run_step(sched, log)  # decode: position 3 fits in each block
    waiting_c = make_seq([5, 5, 5], rid="c")
    sched.add(waiting_c)
    out = sched.schedule()  # position 4 needs a new block for both: b (the latest) is preempted
    assert [s.group.request_id for s in out.seqs] == ["a"]
    assert [s.group.request_id for s in sched.waiting] == ["b", "c"]
    assert b.block_table == [] and b.num_computed_tokens == 0 and len(b.token_ids) == 5


def test_stop_conditions() -> None:
    sched = make_scheduler(num_blocks=8, max_len=10)

    def stop_after(token: int, params: SamplingParams, text: str = "", prev: int = 0) -> tuple[str | None, str]:
        seq = make_seq([1, 1], params)
        seq.token_ids.append(token)
        seq.output_text = text
        return sched.stops.check(seq, prev), seq.output_text

    assert stop_after(EOS, SamplingParams())[0] == "stop"
    assert stop_after(EOS, SamplingParams(ignore_eos=True, max_tokens=5))[0] is None
    assert stop_after(9, SamplingParams(stop_token_ids=[9]))[0] == "stop"
    assert stop_after(9, SamplingParams(max_tokens=1))[0] == "length"
    reason, text = stop_after(9, SamplingParams(stop=["END", "xy"]), "hello xyEND more", prev=5)
    assert reason == "stop" and text == "hello "
    # a stop string that straddles the previous text and the new text is found
    assert stop_after(9, SamplingParams(stop="ab"), "zzzab", prev=4) == ("stop", "zzz")
    assert stop_after(9, SamplingParams(stop="ab"), "zzzaz", prev=4) == (None, "zzzaz")
    long_seq = make_seq(list(range(9)), SamplingParams(max_tokens=100))
    long_seq.token_ids.append(5)
    assert sched.stops.check(long_seq, 0) == "length"  # max_model_len


def test_abort_frees_waiting_and_running() -> None:
    sched = make_scheduler(num_blocks=8)
    a, b = make_seq([1, 2, 3], rid="a"), make_seq([4, 5, 6], rid="b")
    sched.add(a)
    run_step(sched, [])
    sched.add(b)
    sched.abort([a, b])
    assert not sched.has_unfinished() and sched.bm.num_used_blocks == 0


def _decoding(sched: Scheduler, rid: str, prompt: list[int], params: SamplingParams | None = None) -> Sequence:
    """A running sequence past its prefill, its newest token uncomputed."""
    seq = make_seq(prompt, params, rid=rid)
    sched.add(seq)
    out = sched.schedule()
    assert out.seqs == [seq]
    run_step_on(sched, out.seqs)
    return seq


def run_step_on(sched: Scheduler, seqs: list[Sequence]) -> None:
    for seq in seqs:
        seq.num_computed_tokens += seq.num_scheduled_tokens
        sched.bm.register_computed(seq)
        if seq.num_computed_tokens == len(seq.token_ids):
            seq.token_ids.append(fake_token(seq))


def test_decodes_ride_along_with_an_arriving_prefill() -> None:
    """A prompt arriving while r0 decodes: one step prefills it and decodes r0 (budget kept for r0's
    token); a prompt that would take the blocks a decode needs waits; with no room in the
    budget for prefill after the decodes, the decodes keep the whole budget to themselves."""
    sched = make_scheduler(num_blocks=64, budget=10)
    r0 = _decoding(sched, "r0", [3] * 4)
    r1 = make_seq([5] * 12, rid="r1")
    sched.add(r1)
    out = sched.schedule()
    assert out.is_prefill and out.seqs == [r0, r1]
    assert r0.num_scheduled_tokens == 1 and r1.num_scheduled_tokens == 9 and out.num_batched_tokens == 10
    assert len(r0.block_table) * BS >= len(r0.token_ids)  # r0's new token has its slot
    run_step_on(sched, out.seqs)
    assert len(r0.token_ids) == 6 and r1.num_computed_tokens == 9

    tight = make_scheduler(num_blocks=3, budget=10)
    a = _decoding(tight, "a", [3] * 4)  # its next token starts a new block
    b = make_seq([5] * 6, rid="b")
    tight.add(b)  # would take the last two blocks: a would stall, and the next decode step preempt b
    out = tight.schedule()
    assert not out.is_prefill and out.seqs == [a] and list(tight.waiting) == [b] and tight.num_preemptions == 0
    assert len(a.block_table) == 2  # a's next token has its slot

    small = make_scheduler(num_blocks=64, budget=1)
    c = _decoding(small, "c", [3])
    small.add(make_seq([5] * 3, rid="d"))
    out = small.schedule()
    assert [s.group.request_id for s in out.seqs] == ["d"] and c not in out.seqs


def test_decodes_keep_their_slots_beside_a_chunked_prefill() -> None:
    """a decodes while L is prefilled in chunks; when a's next token needs a block and none is free, L,
    the newest, gives way at once (preempted, recomputed later), where a used to stall through L's
    chunks and L be preempted by the decode step after them anyway."""
    sched = make_scheduler(num_blocks=7, budget=4)
    a = _decoding(sched, "a", [3] * 3, SamplingParams(max_tokens=12, ignore_eos=True))
    long = make_seq([5] * 20, SamplingParams(max_tokens=2, ignore_eos=True), rid="L")
    sched.add(long)
    steps = []
    while sched.has_unfinished():
        out = sched.schedule()
        steps.append([s.group.request_id for s in out.seqs])
        run_step_on(sched, out.seqs)
        for seq in out.seqs:
            reason = sched.stops.check(seq, 0) if seq.num_computed_tokens == len(seq.token_ids) - 1 else None
            if reason:
                sched.finish(seq, reason)
    last = max(i for i, st in enumerate(steps) if "a" in st)
    assert all("a" in st for st in steps[:last + 1]), steps  # a never stalls
    assert sched.num_preemptions == 1 and long.num_computed_tokens >= 20
    assert a.token_ids == expected([3] * 3, 12) and long.token_ids == expected([5] * 20, 2)
    assert sched.bm.num_used_blocks == 0


def test_forks_sharing_a_block_decode_without_a_preemption() -> None:
    """Four samples share their prompt's partial block and three blocks are free: their copy-on-write
    needs three, so the decode step takes all four (the count was one block per sample, four, and the
    newest sample was preempted for nothing)."""
    sched = make_scheduler(num_blocks=4)
    parent = make_seq([1, 3, 4], SamplingParams(n=4, max_tokens=5, ignore_eos=True), rid="wide")
    sched.add(parent)
    run_step_on(sched, sched.schedule().seqs)
    children = [Sequence(group=parent.group, index=j, token_ids=[1, 3, 4], seed=j) for j in range(1, 4)]
    parent.group.seqs += children
    sched.add_samples(parent, children)
    for j, seq in enumerate(children):
        seq.num_computed_tokens = 3
        seq.token_ids.append(20 + j)
    out = sched.schedule()
    assert not out.is_prefill and out.seqs == [parent, *children] and sched.num_preemptions == 0
