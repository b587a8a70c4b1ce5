"""OpenAI's Responses API with a reasoning parser and tools (engine/server/responses_api/): reasoning items,
function calls replayed as input, and the reasoning token count; and a fuzz of request bodies.

Oracles as in test_server_responses.py: /v1/chat/completions with the equivalent messages and seed, the
openai package's types, and the token ids for the reasoning token count."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from factories import CHAT_TEMPLATE, JSON_CORPUS, make_triple
from rast_engine.server.api_error import APIError
from test_server_responses import MODEL, SAMPLING, _chat, _create, _stream, _text, _without_ids

# a server with both parsers, whose template opens the thinking
WEATHER = {"type": "function", "name": "get_weather", "description": "the weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}


@pytest.fixture(scope="module")
def think_srv(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    pytest.importorskip("xgrammar")
    from rast_engine.server.app import OpenAIServer
    from server_util import Running, server_engine

    triple = make_triple(tmp_path_factory.mktemp("responses"), extra_corpus=JSON_CORPUS + ("get_weather city",),
                         added_tokens=("<think>", "</think>", "<tool_call>", "</tool_call>"))
    engine = server_engine(triple, reasoning_parser="qwen3")
    opened = "<|assistant|><think>{% endif %}"  # a generation prompt that opens the thinking
    engine.tokenizer.chat_template = CHAT_TEMPLATE.replace("<|assistant|>{% endif %}", opened)
    running = Running(OpenAIServer(engine, model_name=MODEL, tool_call_parser="hermes"))
    running.close_id = engine.tokenizer.convert_tokens_to_ids("</think>")
    yield running
    running.close()


def test_thinking_becomes_a_reasoning_item_and_counts_its_tokens(think_srv) -> None:  # noqa: ANN001
    extra = {"logit_bias": {str(think_srv.close_id): 3.0}, "structured_outputs": {"regex": "(cat|dog)s? [0-9]{2}"}}
    body = {"input": "the sum", "max_output_tokens": 40, **extra, **SAMPLING}
    got = _create(think_srv.url, **body)
    want = _chat(think_srv.url, [{"role": "user", "content": "the sum"}], max_tokens=40, logprobs=True,
                 return_tokens_as_token_ids=True, **extra, **SAMPLING)["choices"][0]
    reasoning, message = got["output"]
    assert reasoning["type"] == "reasoning" and message["type"] == "message"
    assert reasoning["content"] == [{"type": "reasoning_text", "text": want["message"]["reasoning"]}]
    assert _text(got) == want["message"]["content"] and want["message"]["reasoning"]
    ids = [int(e["token"].removeprefix("token_id:")) for e in want["logprobs"]["content"]]
    assert got["usage"]["output_tokens_details"]["reasoning_tokens"] == ids.index(think_srv.close_id) + 1
    final = _stream(think_srv.url, **body)[-1]["response"]
    assert _without_ids(final) == _without_ids({**got, "created_at": final["created_at"]})


def test_a_function_call_item_and_its_output_replayed(think_srv) -> None:  # noqa: ANN001
    messages = [{"role": "user", "content": "weather?"}]
    choice = {"type": "function", "name": "get_weather"}
    sampling = {**SAMPLING, "logit_bias": {str(think_srv.close_id): 3.0}}  # the thinking ends, then the call
    got = _create(think_srv.url, input=messages, tools=[WEATHER], tool_choice=choice, max_output_tokens=150, **sampling)
    want = _chat(think_srv.url, messages, tools=[CHAT_WEATHER], max_tokens=150, **sampling,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})["choices"][0]["message"]
    assert want.get("tool_calls") and got["status"] == "completed", (want, got)
    calls = [item for item in got["output"] if item["type"] == "function_call"]
    assert [(c["name"], c["arguments"]) for c in calls] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in want["tool_calls"]]
    assert got["tool_choice"] == choice and got["tools"] == [WEATHER]
    final = _stream(think_srv.url, input=messages, tools=[WEATHER], tool_choice=choice, max_output_tokens=150,
                    **sampling)[-1]["response"]
    assert _without_ids(final) == _without_ids({**got, "created_at": final["created_at"]})
    # the output items sent back with the call's result read as the chat messages they stand for
    (call,) = calls
    replay = _create(think_srv.url, input=messages + got["output"] + [
        {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}],
        tools=[WEATHER], tool_choice="none", max_output_tokens=8, **SAMPLING)
    function = {"name": call["name"], "arguments": call["arguments"]}
    assistant = {"role": "assistant", "content": None, "reasoning": want.get("reasoning"),
                 "tool_calls": [{"id": call["call_id"], "type": "function", "function": function}]}
    result = {"role": "tool", "tool_call_id": call["call_id"], "content": "sunny"}
    chat = _chat(think_srv.url, messages + [assistant, result], tools=[CHAT_WEATHER], tool_choice="none", max_tokens=8,
                 **SAMPLING)["choices"][0]["message"]
    assert _text(replay) == (chat["content"] or "")


@pytest.mark.parametrize("pieces, reasoning, content, thinking_tokens", [
    (["<th", "ink>", "hm", " </thi", "nk>", "ok"], "hm", "ok", 5),  # the output opens the thinking itself
    (["<", "b>", "ok"], "", "<b>ok", 0),  # a tag prefix that was not "<think>": all answer
    (["hm", "</think>", "ok"], "", "hm</think>ok", 0),  # no "<think>" first: the tag is text
])
def test_reasoning_tokens_are_those_read_until_the_thinking_closed(pieces: list, reasoning: str, content: str,
                                                                   thinking_tokens: int) -> None:
    from rast_engine.outputs import CompletionOutput, RequestOutput
    from rast_engine.server.chat_output import Reasoning
    from rast_engine.server.responses import Formatter
    from rast_engine.server.responses_api.output import ResponseOutput

    out = ResponseOutput(Formatter("chat", "resp_1", MODEL, ["resp_1"], 1, None, None,
                                   reasoning=Reasoning("undecided")), {"id": "resp_1"})
    for i, piece in enumerate(pieces):  # one token an engine output
        last = i == len(pieces) - 1
        out.add(RequestOutput("resp_1", None, [1, 2], [CompletionOutput(0, piece, [10 + i], "stop" if last else None)]))
    body = out.body()
    texts = [(item["type"], item["content"][0]["text"]) for item in body["output"]]
    assert texts == [t for t in (("reasoning", reasoning), ("message", content)) if t[1]]
    assert body["usage"]["output_tokens_details"]["reasoning_tokens"] == thinking_tokens
    assert body["usage"]["output_tokens"] == len(pieces) and body["status"] == "completed"


LEAF = st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["", "x", "text", "function", "message",
                                                                        "user", "json_schema", "input_text"])
JSON = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=2) | st.dictionaries(
    st.sampled_from(["type", "text", "name", "role"]), inner, max_size=2), max_leaves=6)
RICH = {"model": MODEL, "instructions": "be brief", "input": [
    {"role": "user", "content": [{"type": "input_text", "text": "q"}]},
    {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a", "annotations": []}]},
    {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "c1", "output": "2"}],
    "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}], "tool_choice": "none",
    "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}},
    "reasoning": {"effort": None}, "include": ["message.output_text.logprobs"], "top_logprobs": 2,
    "metadata": {"k": "v"}, "stream_options": {"include_obfuscation": False}, "max_output_tokens": 4,
    "logits_processors": ["m.f", {"qualname": "m.g", "args": [1], "kwargs": {"k": 2}}]}


def _paths(value: object, path: tuple = ()) -> list[tuple]:
    kids = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [path] + [p for key, child in kids for p in _paths(child, path + (key,))]


def _replaced(value: object, path: tuple, new: object) -> object:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(copy[path[0]], path[1:], new)
    return copy


PATHS = _paths(RICH)[1:]


@settings(max_examples=600, deadline=None)
@given(where=st.sampled_from(PATHS), new=JSON, then=st.none() | st.tuples(st.sampled_from(PATHS), JSON))
def test_any_request_body_is_a_chat_request_or_a_400(where: tuple, new: object, then: tuple | None) -> None:
    """A valid body with one or two of its values (at any depth) replaced by any JSON value."""
    from rast_engine.server.request_json import parse_request
    from rast_engine.server.responses_api.protocol import ResponsesRequest

    body = _replaced(RICH, where, new)
    if then is not None and then[0] in _paths(body):  # the first replacement may have taken it away
        body = _replaced(body, *then)
    try:
        parse_request(json.dumps(body).encode(), ResponsesRequest).to_chat([])
    except APIError as exc:
        assert exc.status == 400 and exc.param, exc.message
