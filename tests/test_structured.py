"""Structured outputs (JSON schema, JSON object, regex, choice, EBNF grammar) on a tiny triple whose
tokenizer knows JSON's characters. Two oracles: the outputs are checked for what they must be without
xgrammar (json.loads and the schema by hand, re.fullmatch, membership); and the engine's greedy tokens
and sampled logprobs equal HF transformers' forwards combined by Eq. 3, masked by a grammar matcher the
test steps itself."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from logit_adjust_util import LAM, hf_model, make_engine, record_launches, run

from rast_engine import SamplingParams
from rast_engine.errors import RastError
from rast_engine.structured import GRAMMAR_CACHE_BYTES, Grammars, unpack
from rast_engine.structured_params import StructuredOutputsParams

xgr = pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
PROMPT = [5, 9, 9, 17, 4, 9]
CASES = {"json": {"json": SCHEMA}, "json_object": {"json_object": True}, "regex": {"regex": "(cat|dog)s? [0-9]{2}"},
         "choice": {"choice": ["the cat", "a dog", "we"]}, "grammar": {"grammar": 'root ::= "yes" | "no" " " root'}}


def satisfied(kind: str, text: str) -> bool:
    """``text`` is what CASES[kind] asks for, checked without xgrammar."""
    if kind == "regex":
        return re.fullmatch(CASES[kind]["regex"], text) is not None
    if kind == "choice":
        return text in CASES[kind]["choice"]
    if kind == "grammar":
        return re.fullmatch(r"(no )*yes", text) is not None
    value = json.loads(text)
    if kind == "json_object":
        return isinstance(value, dict)
    return (isinstance(value, dict) and set(value) == {"name", "age"} and isinstance(value["name"], str)
            and len(value["name"]) <= 6 and isinstance(value["age"], int) and not isinstance(value["age"], bool))


@torch.no_grad()
def oracle_z(triple: tuple, ids: list[int], vocab: int, matcher: object) -> torch.Tensor:
    """Eq. 3's logits after ``ids``, with the tokens the grammar refuses next at −inf."""
    x = torch.tensor([ids])
    large, rl, base = (hf_model(p)(x).logits[0, -1, :vocab].float() for p in triple)
    z = large + LAM * (rl - base)
    mask = xgr.allocate_token_bitmask(1, vocab)
    matcher.fill_next_token_bitmask(mask)
    return z.masked_fill(~unpack(mask, vocab)[0], float("-inf"))


def oracle_matcher(engine: object, kind: str) -> object:
    info = xgr.TokenizerInfo.from_huggingface(engine.tokenizer, vocab_size=engine.vocab_size,
                                              stop_token_ids=sorted(engine.scheduler.stops.eos_token_ids))
    compiler, spec = xgr.GrammarCompiler(info), CASES[kind]
    compiled = {"json": lambda: compiler.compile_json_schema(json.dumps(SCHEMA)),
                "json_object": lambda: compiler.compile_json_schema('{"type": "object"}'),
                "regex": lambda: compiler.compile_regex(spec.get("regex", "")),
                "choice": lambda: compiler.compile_grammar('root ::= "the cat" | "a dog" | "we"'),
                "grammar": lambda: compiler.compile_grammar(spec.get("grammar", ""))}[kind]()
    return xgr.GrammarMatcher(compiled)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_outputs_hold_their_constraint(json_triple: tuple, kind: str) -> None:
    engine = make_engine(json_triple, max_model_len=128, kv_cache_blocks=256)
    params = SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=80, structured_outputs=CASES[kind])
    outs = run(engine, {"r": (PROMPT, params), "plain": (PROMPT, SamplingParams(max_tokens=8, seed=2))})
    finished = [o for o in outs["r"] if o.finish_reason == "stop"]
    assert finished, [o.text for o in outs["r"]]
    for o in finished:
        assert satisfied(kind, o.text), o.text


@pytest.mark.parametrize("kind", ["json", "regex", "choice"])
def test_greedy_tokens_and_logprobs_equal_the_oracle(json_triple: tuple, kind: str) -> None:
    engine = make_engine(json_triple, max_model_len=128, kv_cache_blocks=256)
    vocab, eos = engine.vocab_size, engine.scheduler.stops.eos_token_ids
    greedy = SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=CASES[kind])
    sampled = SamplingParams(temperature=0.8, seed=5, max_tokens=12, logprobs=0, structured_outputs=CASES[kind])
    outs = run(engine, {"g": (PROMPT, greedy), "s": (PROMPT, sampled)})
    ids, matcher = list(PROMPT), oracle_matcher(engine, kind)
    for _ in range(greedy.max_tokens):
        ids.append(int(oracle_z(json_triple, ids, vocab, matcher).argmax()))
        assert matcher.accept_token(ids[-1])
        if ids[-1] in eos:
            break
    assert outs["g"][0].token_ids == ids[len(PROMPT):]
    ids, matcher = list(PROMPT), oracle_matcher(engine, kind)
    for token, entry in zip(outs["s"][0].token_ids, outs["s"][0].logprobs):
        z = oracle_z(json_triple, ids, vocab, matcher)
        want = torch.log_softmax(z.double() / sampled.temperature, dim=0)[token].item()
        assert entry[token] == pytest.approx(want, abs=2e-4)
        assert matcher.accept_token(token)
        ids.append(token)


def test_tokens_survive_preemption_and_async_scheduling(json_triple: tuple) -> None:
    """Structured draws read the output's tokens: async scheduling never launches them ahead, and with
    preemption or async scheduling the tokens are those of the plain synchronous engine."""
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=7, max_tokens=30, structured_outputs=CASES["json"])
    requests = {f"r{i}": ([7 + i, 9, 9, 30 + i, 4], params) for i in range(4)}
    want = run(make_engine(json_triple), requests)
    for variant, kw in (("preemption", dict(kv_cache_blocks=14, max_model_len=40)),
                        ("async", dict(async_output=True, async_scheduling=True))):
        engine = make_engine(json_triple, **kw)
        launched = record_launches(engine)
        got = run(engine, requests)
        assert {k: v[0].token_ids for k, v in got.items()} == {k: v[0].token_ids for k, v in want.items()}, variant
        assert not any(launched)
        if variant == "preemption":
            assert engine.scheduler.num_preemptions > 0
        else:
            assert launched  # async scheduling was asked whether to launch ahead, and said no


def test_constraints_are_checked(json_triple: tuple, tmp_path: Path) -> None:
    for kw, match in ((dict(), "exactly one"), (dict(regex="a", choice=["a"]), "exactly one"),
                      (dict(choice=[]), "choice"), (dict(regex=""), "regex"), (dict(json=3), "json"),
                      (dict(json="not json"), "one JSON value"),
                      (dict(json='{"type": "string"} {"type": "integer"}'), "one JSON value")):  # not its first
        with pytest.raises(RastError, match=match):
            StructuredOutputsParams(**kw)
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs == StructuredOutputsParams(regex="a+")
    with pytest.raises(RastError, match="structured_outputs"):
        SamplingParams(structured_outputs={"pattern": "a"})
    engine = make_engine(json_triple)
    for so in ({"regex": "("}, {"json": {"type": "nonsense"}}, {"grammar": "root ::= foo"}):
        with pytest.raises(RastError, match=f"structured_outputs.{next(iter(so))} cannot be compiled") as info:
            engine.add_request("x", PROMPT, SamplingParams(structured_outputs=so))
        assert info.value.param == "structured_outputs"
    # a choice is spelled as EBNF literals: quotes, backslashes and non-ASCII characters must survive
    compiled = Grammars(engine.tokenizer, engine.vocab_size, [2]).compile(
        StructuredOutputsParams(choice=['a "b\\"', "é"]))
    for text, complete in (('a "b\\"', True), ("é", True), ('a "b', False)):
        matcher = xgr.GrammarMatcher(compiled)
        assert all(matcher.accept_token(t) for t in engine.tokenizer.encode(text, add_special_tokens=False)), text
        assert matcher.is_completed() == complete, text
    assert engine.grammars.compiler.cache_limit_bytes == GRAMMAR_CACHE_BYTES  # clients' constraints: bounded
    assert not engine.groups


def test_a_constraint_no_token_can_begin_is_refused_at_intake(json_triple: tuple) -> None:
    """A regex whose first character no token spells (the test vocabulary has no "~") was accepted and
    failed at its first draw as NoAdmissibleToken; it is a RastError naming structured_outputs at intake."""
    from rast_engine.errors import RastError

    engine = make_engine(json_triple)
    assert "~" not in "".join(engine.tokenizer.convert_ids_to_tokens(list(range(engine.vocab_size))))
    with pytest.raises(RastError, match="structured_outputs.regex: no token") as refused:
        engine.add_request("r", PROMPT, SamplingParams(max_tokens=4, structured_outputs={"regex": "~[0-9]"}))
    assert refused.value.param == "structured_outputs" and not engine.groups
    engine.add_request("ok", PROMPT, SamplingParams(max_tokens=4, structured_outputs=CASES["regex"]))
    assert run(engine, {})["ok"][0].token_ids


def test_a_constraint_finished_before_min_tokens_names_its_request(json_triple: tuple) -> None:
    from rast_engine.errors import NoAdmissibleToken

    engine = make_engine(json_triple)
    engine.add_request("free", PROMPT, SamplingParams(max_tokens=6, ignore_eos=True))
    engine.add_request("done", PROMPT, SamplingParams(max_tokens=12, min_tokens=8, structured_outputs=CASES["choice"]))
    with pytest.raises(NoAdmissibleToken) as failed:
        run(engine, {})
    assert failed.value.request_ids == failed.value.self_masked == ("done",)
    engine.abort_request("done")
    assert len(run(engine, {})["free"][0].token_ids) == 6


def test_the_server_takes_response_format_and_structured_outputs(json_triple: tuple,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import httpx
    from server_util import MODEL, Running, server_engine

    from rast_engine.server.app import OpenAIServer

    compiled_on, compile_ = [], Grammars.compile

    def recording(self: Grammars, p: StructuredOutputsParams) -> object:
        compiled_on.append(threading.current_thread().name)
        return compile_(self, p)

    monkeypatch.setattr(Grammars, "compile", recording)

    running = Running(OpenAIServer(server_engine(json_triple), model_name=MODEL))
    oracle = server_engine(json_triple)
    try:
        client = running.client()
        fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}
        res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=60, temperature=0,
                                        extra_body={"response_format": fmt})
        want = run(oracle, {"o": (PROMPT, SamplingParams(temperature=0, max_tokens=60,
                                                         structured_outputs={"json": SCHEMA}))})["o"][0]
        assert res.choices[0].text == want.text
        assert want.finish_reason != "stop" or satisfied("json", want.text)
        # compiled first off the engine thread (a cache hit there after), then by the oracle's add_request
        assert compiled_on[0] != "rast-engine" and compiled_on[1] == "rast-engine", compiled_on
        res = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "the cat"}],
                                             max_tokens=60, temperature=1.0, seed=3,
                                             response_format={"type": "json_object"})
        assert res.choices[0].finish_reason != "stop" or satisfied("json_object", res.choices[0].message.content)
        res = client.completions.create(model=MODEL, prompt="the cat", max_tokens=20, temperature=1.0, n=4, seed=1,
                                        extra_body={"structured_outputs": CASES["choice"]})
        assert all(c.text in CASES["choice"]["choice"] for c in res.choices)
        res = client.completions.create(model=MODEL, prompt="the cat", max_tokens=20, temperature=1.0, n=4, seed=1,
                                        extra_body={"guided_choice": CASES["choice"]["choice"]})
        assert all(c.text in CASES["choice"]["choice"] for c in res.choices)  # vLLM's older spelling
        bad = [({"response_format": {"type": "xml"}}, "response_format"),
               ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
               ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "response_format"),
               ({"structured_outputs": {"regex": "("}}, "structured_outputs"),
               ({"guided_regex": "a", "guided_choice": ["a"]}, "structured_outputs"),
               ({"response_format": {"type": "text"}, "guided_regex": "("}, "structured_outputs"),  # text: none
               ({"guided_regex": "a", "structured_outputs": {"regex": "a"}}, "structured_outputs"),
               ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs")]
        for extra, param in bad:
            r = httpx.post(f"{running.url}/v1/completions", json={"model": MODEL, "prompt": "hi", **extra})
            assert (r.status_code, r.json()["error"]["param"]) == (400, param), (extra, r.text)
        # the request's own constraints leave no token (a finished choice, EOS masked): a 400, served on
        finished = {"structured_outputs": {"choice": ["we"]}, "min_tokens": 8, "max_tokens": 12}
        r = httpx.post(f"{running.url}/v1/completions", json={"model": MODEL, "prompt": "hi", **finished})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "no_admissible_token"), r.text
        assert client.completions.create(model=MODEL, prompt="hi", max_tokens=3).choices[0].text
    finally:
        running.close()


def test_grammar_compiles_before_admission_are_bounded(json_triple: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """A constraint compiles on a worker thread before its request is admitted, so nothing counts it in
    flight yet: those compiles are bounded with the tokenizer thread's unadmitted jobs. Capacity 2
    (max_num_seqs 1 + max_waiting 1), two compiles held: a third structured request is a 429, not one
    more compile queued; the held two then finish."""
    import threading
    import time

    import httpx
    from server_util import MODEL, Running, server_engine

    from rast_engine.server.app import OpenAIServer

    gate, compile_ = threading.Event(), Grammars.compile
    monkeypatch.setattr(Grammars, "compile", lambda self, p: gate.wait(30) and compile_(self, p))
    server = OpenAIServer(server_engine(json_triple, max_num_seqs=1), model_name=MODEL, max_waiting=1)
    running = Running(server)
    body = {"model": MODEL, "prompt": "the cat", "max_tokens": 20, "structured_outputs": CASES["choice"]}
    answers: list[httpx.Response] = []
    held = [threading.Thread(target=lambda: answers.append(httpx.post(f"{running.url}/v1/completions", json=body,
                                                                      timeout=60))) for _ in range(2)]
    try:
        for t in held:
            t.start()
        deadline = time.monotonic() + 10
        while server.engine.unadmitted_jobs < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.engine.unadmitted_jobs == 2
        r = httpx.post(f"{running.url}/v1/completions", json=body, timeout=5)  # answered now, not queued
        assert (r.status_code, r.json()["error"]["code"]) == (429, "over_capacity"), r.text
        gate.set()
        for t in held:
            t.join()
        assert [a.status_code for a in answers] == [200, 200]
        assert all(c["text"] in CASES["choice"]["choice"] for a in answers for c in a.json()["choices"])
        assert server.engine.unadmitted_jobs == 0
    finally:
        gate.set()
        running.close()
