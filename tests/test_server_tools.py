"""Tool calls in chat (engine/server/tools.py).

Oracles: the Hermes format read with str.find and json.loads by hand; for a stream, the same reading of
the whole text however it is cut; HF's apply_chat_template for the rendering; and for a constrained
tool_choice the text /v1/completions draws for the same prompt ids under the same JSON schema (the calls
must be exactly that text's)."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from factories import JSON_CORPUS, make_triple
from rast_engine.errors import RastError
from rast_engine.server.api_error import APIError
from rast_engine.server.chat_messages import ChatMessage, render_chat
from rast_engine.server.tools import Tool, ToolMode, ToolStream, extract_calls, required_schema

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "integer"}}, "required": ["zone"], "additionalProperties": False}}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "cat"}}</tool_call>'


def _stripped(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("text, content, calls", [
    ("ok " + CALL, "ok ", [("get_weather", {"city": "cat"})]),
    (CALL + "\n" + CALL.replace("cat", "dog"), None, [("get_weather", {"city": "cat"}), ("get_weather", {"city": "dog"})]),
    ('a <tool_call>{"name": "f", "arguments": {}}', "a ", [("f", {})]),  # an unclosed last block, as vLLM's
    ("a <tool_call>{not json}</tool_call>", "a <tool_call>{not json}</tool_call>", []),  # the text, whole
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
    ("no calls here", "no calls here", []),
])
def test_hermes_blocks_become_calls(text: str, content: str | None, calls: list) -> None:
    got_content, got = extract_calls(ToolMode("auto"), text)
    assert (got_content, _stripped(got)) == (content, calls)
    assert len(extract_calls(ToolMode("auto", single=True), text)[1]) == min(len(calls), 1)


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.sampled_from(["ok ", CALL, "<tool", "_call>", "{", "}", " x", "\n", "</tool_call>"]),
                       max_size=8), cuts=st.lists(st.integers(0, 200), max_size=5))
def test_a_streams_content_and_calls_join_to_the_whole_texts(pieces: list[str], cuts: list[int]) -> None:
    text = "".join(pieces)
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])] or [""]
    stream = ToolStream(ToolMode("auto"))
    sent, calls = "", []
    for i, delta in enumerate(deltas):
        out, made = stream.feed(delta, final=i == len(deltas) - 1)
        sent += out
        calls += made
    content, want = extract_calls(ToolMode("auto"), text)
    assert (sent, _stripped(calls)) == (content or "", _stripped(want))


def test_tools_and_tool_messages_reach_the_template_as_hf_renders_them(tmp_path) -> None:  # noqa: ANN001
    from factories import make_tokenizer

    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok"))
    tok.chat_template = ("{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}"
                         "<|{{ m.role }}|>{{ m.content }}{% for c in m.tool_calls or [] %}{{ c.function.name }}"
                         "({{ c.function.arguments.city }}){% endfor %}{% if m.tool_call_id %}#{{ m.tool_call_id }}"
                         "{% endif %}\n{% endfor %}")
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    got = render_chat(tok, [ChatMessage(**m) for m in messages], False, tools=[Tool(**WEATHER), Tool(**TIME)])
    hf = [messages[0], {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        messages[2]]
    assert got == tok.apply_chat_template(hf, tools=[WEATHER, TIME], tokenize=False)
    assert got == "[get_weather][get_time]<|user|>weather?<|assistant|>get_weather(Oslo)<|tool|>sunny#c1"  # trim_blocks
    bad_args = {**messages[1], "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{x"}}]}
    with pytest.raises(APIError, match="not JSON"):
        render_chat(tok, [ChatMessage(**bad_args)], False)
    with pytest.raises(APIError, match="tool_call_id"):
        ChatMessage(role="tool", content="sunny")


@pytest.fixture(scope="module")
def tool_srv(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    pytest.importorskip("xgrammar")
    from server_util import MODEL, Running, server_engine

    from rast_engine.server.app import OpenAIServer

    triple = make_triple(tmp_path_factory.mktemp("tools"), extra_corpus=JSON_CORPUS + ("get_weather city zone ok",),
                         added_tokens=("<tool_call>", "</tool_call>"))
    running = Running(OpenAIServer(server_engine(triple), model_name=MODEL, tool_call_parser="hermes"))
    yield running
    running.close()


MESSAGES = [{"role": "user", "content": "the cat"}]


def _completion(url: str, tools: list, schema_or_regex: dict, n: int = 1) -> list[dict]:
    """What /v1/completions draws after the chat prompt's ids (with the tools) under this constraint."""
    ids = httpx.post(f"{url}/tokenize", json={"messages": MESSAGES, "tools": tools}).json()["tokens"]
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-rast", "prompt": ids, "max_tokens": 60, "seed": 4,
                                                   "temperature": 1.0, "n": n, "structured_outputs": schema_or_regex})
    assert r.status_code == 200, r.text
    return r.json()["choices"]


def _chat(url: str, n: int = 1, stream: bool = False, **body: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "tiny-rast", "messages": MESSAGES, "max_tokens": 60, "seed": 4, "temperature": 1.0, "n": n,
        "stream": stream, **body})


def _streamed(r: httpx.Response) -> dict[int, dict]:
    """Each choice's joined content, calls and finish reason from an SSE body."""
    out: dict[int, dict] = {}
    for line in r.text.splitlines():
        if not line.startswith("data: {"):
            continue
        for c in json.loads(line[6:])["choices"]:
            got = out.setdefault(c["index"], {"content": "", "calls": [], "finish": None})
            got["content"] += c["delta"].get("content") or ""
            got["calls"] += c["delta"].get("tool_calls") or []
            got["finish"] = c["finish_reason"] or got["finish"]
    return out


def test_a_named_function_is_called_with_the_schemas_json(tool_srv) -> None:  # noqa: ANN001
    params = WEATHER["function"]["parameters"]
    want = _completion(tool_srv.url, [WEATHER, TIME], {"json": params}, n=2)
    body = {"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    got = _chat(tool_srv.url, n=2, **body).json()["choices"]
    streamed = _streamed(_chat(tool_srv.url, n=2, stream=True, **body))
    for i, (c, w) in enumerate(zip(got, want)):
        (call,) = c["message"]["tool_calls"]
        assert (call["function"]["name"], call["function"]["arguments"]) == ("get_weather", w["text"])
        assert c["message"]["content"] is None
        assert c["finish_reason"] == w["finish_reason"]  # a forced call: "stop", as OpenAI's and vLLM's
        assert [(s["function"]["name"], s["function"]["arguments"]) for s in streamed[i]["calls"]] == \
            [("get_weather", w["text"])] and streamed[i]["content"] == "" and streamed[i]["finish"] == c["finish_reason"]
        if w["finish_reason"] == "stop":
            assert isinstance(json.loads(w["text"])["city"], str)


UNIT = {"type": "function", "function": {"name": "set_unit", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"], "additionalProperties": False}}}
FLAG = {"type": "function", "function": {"name": "set_flag", "parameters": {
    "type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"], "additionalProperties": False}}}


@pytest.mark.parametrize("parallel", [False, True])
def test_required_calls_any_tool_with_its_parameters(tool_srv, parallel: bool) -> None:  # noqa: ANN001
    schema = required_schema([Tool(**UNIT), Tool(**FLAG)], single=not parallel)
    want = _completion(tool_srv.url, [UNIT, FLAG], {"json": schema}, n=3)
    got = _chat(tool_srv.url, n=3, tools=[UNIT, FLAG], tool_choice="required",
                parallel_tool_calls=parallel).json()["choices"]
    completed = 0
    for c, w in zip(got, want):
        try:
            calls = [(x["name"], x["parameters"]) for x in json.loads(w["text"])]
        except ValueError:  # cut JSON: no calls, the text as content
            assert c["message"]["content"] == w["text"] and "tool_calls" not in c["message"]
            continue
        assert calls and _stripped(c["message"]["tool_calls"]) == calls and c["message"]["content"] is None
        assert c["finish_reason"] == ("tool_calls" if w["finish_reason"] == "stop" else "length")
        assert all((name, set(args)) in (("set_unit", {"unit"}), ("set_flag", {"on"})) for name, args in calls)
        assert parallel or len(calls) == 1
        completed += 1
    assert completed or parallel, "setup: no single call completed within max_tokens"


def test_auto_reads_hermes_blocks_from_the_output(tool_srv) -> None:  # noqa: ANN001
    regex = r'ok <tool_call>\{"name": "get_weather", "arguments": \{"city": "(cat|dog)"\}\}</tool_call>'
    (want,) = _completion(tool_srv.url, [WEATHER], {"regex": regex})
    got = _chat(tool_srv.url, tools=[WEATHER], structured_outputs={"regex": regex}).json()["choices"][0]
    city = json.loads(want["text"][len("ok <tool_call>"):-len("</tool_call>")])["arguments"]["city"]
    assert got["message"]["content"] == "ok " and _stripped(got["message"]["tool_calls"]) == [("get_weather", {"city": city})]
    assert got["finish_reason"] == "tool_calls"
    streamed = _streamed(_chat(tool_srv.url, stream=True, tools=[WEATHER], structured_outputs={"regex": regex}))[0]
    assert streamed["content"] == "ok " and _stripped(streamed["calls"]) == [("get_weather", {"city": city})]
    # "none": the tools reach the template, the output is text
    plain = _chat(tool_srv.url, tools=[WEATHER], tool_choice="none", structured_outputs={"regex": regex}).json()
    assert plain["choices"][0]["message"]["content"] == want["text"]


@pytest.mark.parametrize("body, param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "none"}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}], "tool_choice": "none"}, "tools"),
])
def test_bad_tool_requests_are_400s(tool_srv, body: dict, param: str) -> None:  # noqa: ANN001
    r = _chat(tool_srv.url, **body)
    assert (r.status_code, r.json()["error"]["param"]) == (400, param), r.text


def test_auto_needs_the_servers_parser(srv) -> None:  # noqa: ANN001
    from server_util import MODEL, server_engine  # noqa: F401

    from rast_engine.server.app import OpenAIServer

    r = _chat(srv.url, tools=[WEATHER])  # tools without tool_choice: "auto", as vLLM's default
    assert (r.status_code, r.json()["error"]["param"]) == (400, "tool_choice") and "--enable-auto-tool-choice" in r.text
    with pytest.raises(RastError, match="tool_call_parser must be one of"):
        OpenAIServer(srv.server.engine.engine, model_name="m", tool_call_parser="mistral")


def test_calls_are_read_from_the_answer_after_the_thinking() -> None:
    from rast_engine.server.chat_output import ChatParts, Reasoning

    text = "<think>\nweather? " + CALL + "</think>\n\nok " + CALL
    reasoning, mode = Reasoning.of("qwen3", "<|assistant|>", True), ToolMode("auto")
    message = ChatParts(reasoning, mode).message(text)
    assert (message["reasoning"], message["content"]) == ("weather? " + CALL, "ok ")
    assert _stripped(message["tool_calls"]) == [("get_weather", {"city": "cat"})]
    parts, joined = ChatParts(reasoning, mode), {"reasoning": "", "content": "", "calls": []}
    for i in range(len(text) + 1):  # one character a delta, then the end
        delta = parts.delta(text[i:i + 1], final=i == len(text))
        joined["reasoning"] += delta.get("reasoning") or ""
        joined["content"] += delta.get("content") or ""
        joined["calls"] += delta.get("tool_calls") or []
    assert (joined["reasoning"], joined["content"]) == (message["reasoning"], message["content"])
    assert _stripped(joined["calls"]) == _stripped(message["tool_calls"]) and parts.finish_reason("stop") == "tool_calls"


def test_review_edges_of_calls_and_replays() -> None:
    """Found by a review: "required" over tools whose parameters use $defs (pydantic's nested models) keeps
    the references resolvable; a lone surrogate escape in a call's arguments stays JSON a UTF-8 body can
    carry; JSON nested past Python's recursion limit is no call (model output) or a 400 (a request); the
    openai client's stream helper's extra fields (index, parsed_arguments, parsed) replay."""
    city = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    nested = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}, "$defs": {"City": city}}}}
    schema = required_schema([Tool(**nested), Tool(**WEATHER)], single=False)
    assert schema["$defs"] == {"City": city} and "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    other = {"type": "function", "function": {"name": "g", "parameters": {"$defs": {"City": {"type": "string"}}}}}
    with pytest.raises(APIError, match="differently"):
        required_schema([Tool(**nested), Tool(**other)], single=False)
    _, calls = extract_calls(ToolMode("auto"), '<tool_call>{"name": "f", "arguments": {"x": "\\ud800"}}</tool_call>')
    calls[0]["function"]["arguments"].encode("utf-8")
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": "\ud800"}
    deep = "[" * 5000 + "]" * 5000
    assert extract_calls(ToolMode("required"), deep) == (deep, [])
    assert extract_calls(ToolMode("auto"), f"<tool_call>{deep}</tool_call>")[1] == []
    with pytest.raises(APIError, match="not JSON"):
        ChatMessage(role="assistant", tool_calls=[{"type": "function", "function": {"name": "f", "arguments": deep}}]
                    ).for_template()
    helper = ChatMessage(role="assistant", content=None, parsed=None, tool_calls=[
        {"id": "c", "index": 0, "type": "function",
         "function": {"name": "f", "arguments": "{}", "parsed_arguments": None}}])
    assert helper.for_template()["tool_calls"] == [{"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}]


def test_required_resolves_pydantic_refs_on_the_server(tool_srv) -> None:  # noqa: ANN001
    city = {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"],
            "additionalProperties": False}
    nested = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"c": {"$ref": "#/$defs/C"}}, "required": ["c"], "additionalProperties": False,
        "$defs": {"C": city}}}}
    r = _chat(tool_srv.url, tools=[nested], tool_choice="required", parallel_tool_calls=False)
    assert r.status_code == 200, r.text


def test_a_named_choice_without_an_answer_makes_no_call() -> None:
    """Found by a soak: an output that ended (EOS) inside the thinking leaves the named choice no answer;
    it is no call with empty arguments, as "required" is none."""
    assert extract_calls(ToolMode("named", "f"), "") == ("", [])
    assert extract_calls(ToolMode("named", "f"), '{"x": 1}')[1][0]["function"]["arguments"] == '{"x": 1}'
