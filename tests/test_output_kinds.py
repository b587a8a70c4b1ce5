"""SamplingParams.output_kind: what a request's outputs carry, against its cumulative twin.

Two requests with the same prompt, parameters and seed draw the same tokens in the same steps (seeded
sampling does not depend on the batch), so a "cumulative" request is the oracle of a "delta" or
"final_only" twin run beside it: the deltas joined must give the cumulative output of every step, and
the one final output the last cumulative one.
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from rast_engine import LLM, LLMEngine, SamplingParams
from rast_engine.errors import RastError
from rast_engine.outputs import CompletionOutput, RequestOutput
from test_engine_lifecycle import BS, LAM, TEXTS, alone, assert_clean, encode, fail, make_engine, summary


def _joined(deltas: list[CompletionOutput]) -> tuple:
    lps = [d for c in deltas for d in (c.logprobs or [])]
    return ("".join(c.text for c in deltas), [t for c in deltas for t in c.token_ids],
            lps if any(c.logprobs is not None for c in deltas) else None)


@pytest.mark.parametrize("async_output", [False, True])
def test_delta_outputs_join_to_the_cumulative_ones_step_by_step(qwen2_triple: tuple, async_output: bool) -> None:
    """n = 2 with logprobs and a stop string reached mid-output (its last characters held back): at every
    step each sample's deltas so far join to its cumulative output, each delta brings only new tokens (one
    a step), a finish is reported once and nothing after it, and the prompt ids are one shared copy."""
    engine = make_engine(qwen2_triple, async_output=async_output)
    prompt = encode(engine, TEXTS[2])
    probe = dict(n=2, temperature=1.0, max_tokens=14, seed=5, ignore_eos=True)
    engine.add_request("probe", prompt, SamplingParams(**probe, output_kind="final_only"))
    while engine.has_unfinished_requests():
        texts = [c.text for o in engine.step() for c in o.outputs]
    stop = texts[0][len(texts[0]) // 2:][:3]  # sample 0 reaches it mid-output; sample 1 may or may not
    kw = dict(probe, stop=[stop], logprobs=2)
    engine.add_request("cum", prompt, SamplingParams(**kw))
    engine.add_request("dlt", prompt, SamplingParams(**kw, output_kind="delta"))
    deltas: dict[int, list[CompletionOutput]] = {0: [], 1: []}
    finals: list[RequestOutput] = []
    prompts = set()
    while engine.has_unfinished_requests():
        outs = {o.request_id: o for o in engine.step()}
        assert ("cum" in outs) == ("dlt" in outs), "the twins progressed in different steps"
        if "dlt" not in outs:
            continue
        prompts.add(id(outs["dlt"].prompt_token_ids))
        assert outs["dlt"].prompt_token_ids == prompt
        for c in outs["dlt"].outputs:
            assert len(c.token_ids) <= 1 and (c.token_ids or c.text or c.finish_reason), c
            assert not any(d.finish_reason for d in deltas[c.index]), "a delta after the finish"
            deltas[c.index].append(c)
        for c in outs["cum"].outputs:
            assert _joined(deltas[c.index]) == (c.text, c.token_ids, c.logprobs)
        assert outs["dlt"].finished == outs["cum"].finished
        finals.append(outs["cum"])
    assert finals[-1].finished and finals[-1].outputs[0].finish_reason == "stop"
    for i, c in enumerate(finals[-1].outputs):
        assert deltas[i][-1].finish_reason == c.finish_reason
        assert deltas[i][-1].cumulative_logprob == pytest.approx(c.cumulative_logprob)
    assert len(prompts) == 1
    assert_clean(engine)


def test_final_only_requests_yield_one_output(qwen2_triple: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """A final_only request's one output equals a cumulative twin's last; LLM.generate asks for it, so it
    builds one output per request instead of one per request and step."""
    from rast_engine.sequence import SequenceGroup

    engine = make_engine(qwen2_triple)
    prompt = encode(engine, TEXTS[0])
    kw = dict(n=2, temperature=1.0, max_tokens=7, seed=4, ignore_eos=True)
    engine.add_request("cum", prompt, SamplingParams(**kw))
    engine.add_request("fin", prompt, SamplingParams(**kw, output_kind="final_only"))
    seen: dict[str, list] = {"cum": [], "fin": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert len(seen["cum"]) == 7 and [o.finished for o in seen["fin"]] == [True]
    assert summary(seen["fin"][0]) == summary(seen["cum"][-1])
    built = []
    output = SequenceGroup.output
    monkeypatch.setattr(SequenceGroup, "output", lambda self: (built.append(self.request_id), output(self))[1])
    llm = LLM(str(qwen2_triple[0]), str(qwen2_triple[1]), str(qwen2_triple[2]), lam=LAM, block_size=BS,
              kv_cache_blocks=128, seed=3)
    outs = llm.generate([prompt, prompt[:5]], SamplingParams(**kw), use_tqdm=False)
    assert len(built) == 2 and [len(o.outputs) for o in outs] == [2, 2]
    with pytest.raises(RastError, match="output_kind"):
        SamplingParams(output_kind="streaming")
    assert_clean(engine)


@pytest.fixture(scope="module")
def oracle(qwen2_triple: tuple) -> LLMEngine:
    return make_engine(qwen2_triple, blocks=256, caching=False, async_output=False)


@pytest.mark.parametrize("ahead", [True, False])
def test_outputs_of_a_step_whose_next_launch_fails_come_with_the_next_step(
        qwen2_triple: tuple, oracle: LLMEngine, monkeypatch: pytest.MonkeyPatch, ahead: bool) -> None:
    """The step takes its batch's tokens, builds their outputs, then the launch after it fails and it
    raises: the next step returns those outputs first. Otherwise a delta would be lost (its tokens
    were reported as sent) and a request finishing in that step never reported finished (with steps
    ahead: one whose pending token reached max_tokens, so the failed step ahead left it out). The
    failure comes after each of the first steps in turn."""
    ids = encode(make_engine(qwen2_triple), TEXTS[1])
    delta = SamplingParams(temperature=1.0, max_tokens=9, seed=3, ignore_eos=True, output_kind="delta")
    short = SamplingParams(temperature=1.0, max_tokens=3, seed=4, ignore_eos=True)
    want_delta = alone(oracle, ids, replace(delta, output_kind="cumulative"))[0][:2]
    want_short = alone(oracle, ids, short)
    for before in range(1, 5):
        engine = make_engine(qwen2_triple, async_output=True, async_scheduling=ahead)
        engine.add_request("delta", ids, delta)
        engine.add_request("short", ids, short)
        deltas, done = [], {}

        def take(outs: list[RequestOutput]) -> None:
            for o in outs:
                deltas.extend(c for c in o.outputs if o.request_id == "delta")
                if o.finished:
                    assert o.request_id not in done, "reported finished twice"
                    done[o.request_id] = summary(o)

        for _ in range(before):
            take(engine.step())
        fail(monkeypatch, engine.runner, "forward_logits")
        with pytest.raises(RuntimeError, match="injected"):
            engine.step()
        monkeypatch.undo()
        while engine.has_unfinished_requests():
            take(engine.step())
        assert ([t for c in deltas for t in c.token_ids], "".join(c.text for c in deltas)) == want_delta, before
        assert done["short"] == want_short, before
        assert_clean(engine)
