"""OpenAI's Responses API (engine/server/responses_api/).

Oracles: /v1/chat/completions with the messages a Responses request stands for, the same seed and
sampling (its output, reasoning, calls and logprobs are tested against HF transformers and the tokenizer
elsewhere); the openai package's own types, which every body and stream event must validate as; the
prefix cache's block arithmetic for cached tokens; and the token ids for the reasoning token count."""
from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from factories import CHAT_TEMPLATE, JSON_CORPUS, make_triple
from rast_engine.server.api_error import APIError
from rast_engine.server.chat_messages import ChatMessage
from rast_engine.server.responses_api.input_items import input_messages
from rast_engine.server.responses_api.store import ResponseStore, StoredResponse
from rast_engine.server.tools import FunctionCall, ToolCall

MODEL = "tiny-rast"
SAMPLING = {"temperature": 1.0, "seed": 7}
EVENTS, RESPONSE = TypeAdapter(ResponseStreamEvent), TypeAdapter(Response)
FILLERS: tuple[Any, ...] = (None, 0, "", [], {})


def _validates(adapter: TypeAdapter, data: dict[str, Any]) -> None:
    """``data`` is of the openai package's type, strictly, in every field it holds. A field it lacks is
    given whatever filler the type takes: newer packages declare fields the Responses API added later,
    which a server need not send (the package's client reads bodies leniently)."""
    data = json.loads(json.dumps(data))
    fillers: dict[tuple, int] = {}  # a field filled in -> which of FILLERS it holds
    for _ in range(200):
        try:
            adapter.validate_python(data)
            return
        except ValidationError as exc:
            err = next((e for e in exc.errors() if e["type"] == "missing" or e["loc"] in fillers), None)
            if err is None:
                raise
            loc = err["loc"]
            where: Any = data
            for key in loc[:-1]:  # union members' names in the path are not keys of the data
                if (isinstance(where, dict) and key in where) or (isinstance(where, list) and isinstance(key, int)):
                    where = where[key]
            fillers[loc] = fillers.get(loc, -1) + 1
            if fillers[loc] == len(FILLERS):
                raise
            where[loc[-1]] = FILLERS[fillers[loc]]
    raise AssertionError("too many fields missing")


def _create(url: str, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/responses", json={"model": MODEL, **body}, timeout=120)
    assert r.status_code == 200, r.text
    _validates(RESPONSE, r.json())
    return r.json()


def _chat(url: str, messages: list[dict[str, Any]], **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": messages, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(url: str, **body: Any) -> list[dict[str, Any]]:
    """The stream's events, each checked against the openai package's event types and its SSE name."""
    r = httpx.post(f"{url}/v1/responses", json={"model": MODEL, "stream": True, **body}, timeout=120)
    assert r.status_code == 200, r.text
    events = []
    for block in r.text.strip().split("\n\n"):
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        _validates(EVENTS, event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def _text(response: dict[str, Any]) -> str:
    return "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"])


def _without_ids(response: dict[str, Any]) -> dict[str, Any]:
    return {**response, "id": None, "created_at": None,
            "output": [{**item, "id": None, "call_id": None} for item in response["output"]]}


@pytest.mark.parametrize("body, messages", [
    ({"input": "the cat", "prompt_cache_key": "k", "safety_identifier": "u1"},
     [{"role": "user", "content": "the cat"}]),
    ({"instructions": "be brief", "input": [
        {"role": "developer", "content": "count"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "3 +"},
                                                         {"type": "input_text", "text": "5 ="}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "8", "annotations": []}]},
        {"role": "user", "content": "and 2?"}]},
     [{"role": "system", "content": "be brief"}, {"role": "developer", "content": "count"},
      {"role": "user", "content": "3 +\n5 ="}, {"role": "assistant", "content": "8"},
      {"role": "user", "content": "and 2?"}]),
])
@pytest.mark.parametrize("limits, status", [({"max_output_tokens": 6}, "incomplete"),
                                            ({"max_output_tokens": 40, "stop": [" "]}, "completed")])
def test_a_response_is_the_chat_completion_of_its_input(srv, body: dict, messages: list, limits: dict,
                                                        status: str) -> None:  # noqa: ANN001
    got = _create(srv.url, **body, **limits, **SAMPLING)
    chat_limits = {"max_tokens" if k == "max_output_tokens" else k: v for k, v in limits.items()}
    want = _chat(srv.url, messages, **chat_limits, **SAMPLING)
    (choice,) = want["choices"]
    assert _text(got) == choice["message"]["content"]
    assert choice["finish_reason"] == {"incomplete": "length", "completed": "stop"}[status]
    assert got["status"] == status and [item["status"] for item in got["output"]] == [status]
    assert got["incomplete_details"] == ({"reason": "max_output_tokens"} if status == "incomplete" else None)
    usage = want["usage"]
    assert (got["usage"]["input_tokens"], got["usage"]["output_tokens"], got["usage"]["total_tokens"]) == \
        (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"])
    assert got["usage"]["output_tokens_details"] == {"reasoning_tokens": 0}  # no reasoning parser
    assert (got["temperature"], got["instructions"], got["store"]) == (1.0, body.get("instructions"), True)
    assert (got["prompt_cache_key"], got["safety_identifier"]) == (body.get("prompt_cache_key"),
                                                                   body.get("safety_identifier"))


def test_a_stream_rebuilds_the_response(srv) -> None:  # noqa: ANN001
    body = {"input": "what is the answer?", "max_output_tokens": 12, **SAMPLING}
    whole = _create(srv.url, **body)
    events = _stream(srv.url, **body)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    final = events[-1]["response"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == _text(whole)
    assert _without_ids(final) == _without_ids({**whole, "created_at": final["created_at"]})
    item_id = final["output"][0]["id"]
    assert all(e["item_id"] == item_id for e in events if "item_id" in e)


def test_previous_response_id_continues_the_conversation(srv) -> None:  # noqa: ANN001
    first = _create(srv.url, instructions="be brief", input="the cat", max_output_tokens=5, **SAMPLING)
    second = _create(srv.url, instructions="go on", previous_response_id=first["id"], input="and the dog",
                     max_output_tokens=5, **SAMPLING)
    third = _create(srv.url, previous_response_id=second["id"], input=[{"role": "user", "content": "so?"}],
                    max_output_tokens=5, **SAMPLING)
    # instructions are not carried on; each turn's output is replayed as its assistant message
    turns = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": _text(first)},
             {"role": "user", "content": "and the dog"}]
    want = _chat(srv.url, [{"role": "system", "content": "go on"}, *turns], max_tokens=5, **SAMPLING)
    assert _text(second) == want["choices"][0]["message"]["content"] and second["previous_response_id"] == first["id"]
    turns += [{"role": "assistant", "content": _text(second)}, {"role": "user", "content": "so?"}]
    assert _text(third) == _chat(srv.url, turns, max_tokens=5, **SAMPLING)["choices"][0]["message"]["content"]

    assert httpx.get(f"{srv.url}/v1/responses/{first['id']}").json() == first
    assert httpx.delete(f"{srv.url}/v1/responses/{first['id']}").json() == \
        {"id": first["id"], "object": "response", "deleted": True}
    for gone in (httpx.get(f"{srv.url}/v1/responses/{first['id']}"),
                 httpx.post(f"{srv.url}/v1/responses", json={"model": MODEL, "input": "x",
                                                             "previous_response_id": first["id"]})):
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "response_not_found"
    # the chain does not depend on the deleted first response: the second keeps its whole conversation
    assert _text(_create(srv.url, previous_response_id=second["id"], input="so?", max_output_tokens=5,
                         **SAMPLING)) == _text(third)
    unstored = _create(srv.url, input="the cat", max_output_tokens=2, store=False)
    assert unstored["store"] is False and httpx.get(f"{srv.url}/v1/responses/{unstored['id']}").status_code == 404


def _polled(url: str, response_id: str, until: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        body = httpx.get(f"{url}/v1/responses/{response_id}").json()
        if until(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_a_background_response_is_polled_and_can_be_cancelled(srv) -> None:  # noqa: ANN001
    body = {"input": "the cat", "max_output_tokens": 6, **SAMPLING}
    started = _create(srv.url, background=True, **body)
    assert started["background"] is True and started["status"] == "in_progress" and started["output"] == []
    ended = _polled(srv.url, started["id"], lambda b: b["status"] != "in_progress")
    _validates(RESPONSE, ended)
    want = _create(srv.url, **body)
    assert (_text(ended), ended["status"], ended["usage"]["output_tokens"]) == \
        (_text(want), want["status"], want["usage"]["output_tokens"])
    again = httpx.post(f"{srv.url}/v1/responses/{started['id']}/cancel")
    assert again.status_code == 400 and "incomplete" in again.json()["error"]["message"]

    running = _create(srv.url, background=True, input="the cat", ignore_eos=True)  # to the end of the context
    assert _polled(srv.url, running["id"], lambda b: True)["status"] == "in_progress"
    refused = httpx.post(f"{srv.url}/v1/responses", json={"model": MODEL, "input": "x",
                                                          "previous_response_id": running["id"]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "previous_response_id"
    engine = srv.server.engine.engine

    def aborted(since: int) -> bool:
        """The engine went idle without running on to the end of the context, some 500 tokens on (the abort
        reaches the engine thread between two of its steps)."""
        deadline = time.monotonic() + 30
        while engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not engine.has_unfinished_requests() and engine.stats().generation_tokens_total - since < 100

    tokens = engine.stats().generation_tokens_total
    cancelled = httpx.post(f"{srv.url}/v1/responses/{running['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and _polled(srv.url, running["id"], lambda b: True) == cancelled
    assert aborted(tokens)
    assert httpx.post(f"{srv.url}/v1/responses/resp_nope/cancel").status_code == 404
    deleted = _create(srv.url, background=True, input="the cat", ignore_eos=True)["id"]
    tokens = engine.stats().generation_tokens_total
    assert httpx.delete(f"{srv.url}/v1/responses/{deleted}").json()["deleted"]  # and cancelled, not left running
    assert aborted(tokens) and httpx.get(f"{srv.url}/v1/responses/{deleted}").status_code == 404


def test_cached_tokens_are_the_prefix_cache_hits(srv) -> None:  # noqa: ANN001
    block = srv.server.engine.engine.config.block_size
    text = "the cached prompt: " + " ".join(f"word{i}" for i in range(40))
    first = _create(srv.url, input=text, max_output_tokens=1)
    again = _create(srv.url, input=text, max_output_tokens=1)
    prompt = first["usage"]["input_tokens"]
    assert prompt > 2 * block
    # a repeated prompt takes all its full blocks from the cache but the one holding its last token,
    # which is computed again for its logits
    assert (first["usage"]["input_tokens_details"]["cached_tokens"],
            again["usage"]["input_tokens_details"]["cached_tokens"]) == (0, (prompt - 1) // block * block)


def test_logprobs_are_the_chat_logprobs(srv) -> None:  # noqa: ANN001
    body = {"input": "3 + 5 =", "max_output_tokens": 6, "include": ["message.output_text.logprobs"],
            "top_logprobs": 2, **SAMPLING}
    got = _create(srv.url, **body)["output"][0]["content"][0]["logprobs"]
    want = _chat(srv.url, [{"role": "user", "content": "3 + 5 ="}], max_tokens=6, logprobs=True, top_logprobs=2,
                 **SAMPLING)["choices"][0]["logprobs"]["content"]
    assert got == want and len(got) == 6 and all(len(e["top_logprobs"]) == 2 for e in got)
    deltas = [e for e in _stream(srv.url, **body) if e["type"] == "response.output_text.delta"]
    streamed = [lp for e in deltas for lp in e["logprobs"]]
    assert streamed == want


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
    ({"input": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]}, "input"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input"),
    ({"input": [{"type": "reasoning", "summary": [], "encrypted_content": "abc"}]}, "input"),
    ({"input": []}, "input"),
    ({"input": "x", "background": True, "store": False}, "background"),
    ({"input": "x", "background": True, "stream": True}, "background"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
    ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": "x", "include": ["reasoning.encrypted_content"]}, "include"),
    ({"input": "x", "top_logprobs": 3}, "top_logprobs"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, "text"),
    ({"input": "x", "text": {"format": {"type": "json_object"}}, "structured_outputs": {"regex": "a"}}, "text"),
    ({"input": "x", "tool_choice": {"type": "file_search"}, "tools": []}, "tool_choice"),
    ({"input": "x", "tools": [{"type": "function", "name": "f"}], "tool_choice": "auto"}, "tool_choice"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "lamda": 1.0}, "lamda"),
    ({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_id"),
])
def test_what_the_server_lacks_is_refused_naming_the_field(srv, body: dict, param: str) -> None:  # noqa: ANN001
    r = httpx.post(f"{srv.url}/v1/responses", json={"model": MODEL, **body})
    assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text
    assert _create(srv.url, input="still serving", max_output_tokens=1)["status"] == "incomplete"


def test_function_calls_join_their_turn_and_reasoning_its_answer() -> None:
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{\"a\": 1}", "status": "completed"}
    thought = {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]}
    got = input_messages([{"role": "user", "content": "q"}, thought,
                          {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                           "content": [{"type": "output_text", "text": "ok", "annotations": [], "logprobs": []}]},
                          call, {"type": "function_call_output", "call_id": "c1", "output": "2"}, thought, call])
    calls = [ToolCall(id="c1", function=FunctionCall(name="f", arguments="{\"a\": 1}"))]
    assert got == [ChatMessage(role="user", content="q"),
                   ChatMessage(role="assistant", content=[{"type": "text", "text": "ok"}], reasoning="hm",
                               tool_calls=calls),
                   ChatMessage(role="tool", content="2", tool_call_id="c1"),
                   ChatMessage(role="assistant", reasoning="hm", tool_calls=calls)]


def test_the_store_forgets_the_least_recently_used() -> None:
    store = ResponseStore(2)
    for name in "abc":
        if name == "c":
            assert store.get("a") is not None  # a use: "b" is now the oldest
        store.put(name, StoredResponse({"id": name}, []))
    assert [store.get(n) is not None for n in "abc"] == [True, False, True] and len(store) == 2
    assert store.delete("a") and not store.delete("a")
    none = ResponseStore(0)
    none.put("a", StoredResponse({}, []))
    assert len(none) == 0


# ---- reasoning and tools: a server with both parsers, whose template opens the thinking ----
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


def test_prompt_tokens_details_count_the_cache_hits_where_asked(server_triple: tuple, srv) -> None:  # noqa: ANN001
    from rast_engine.server.app import OpenAIServer
    from server_util import Running, server_engine

    running = Running(OpenAIServer(server_engine(server_triple), model_name=MODEL, enable_prompt_tokens_details=True))
    try:
        text = "details: " + " ".join(f"item{i}" for i in range(40))
        body = {"model": MODEL, "prompt": [text, text + " more"], "max_tokens": 2}
        first = httpx.post(f"{running.url}/v1/completions", json=body).json()["usage"]
        again = httpx.post(f"{running.url}/v1/completions", json=body).json()["usage"]
        block = running.server.engine.engine.config.block_size
        prompt = len(running.server.tokenizer.encode(text))
        # the second prompt extends the first: in the first request it may hit the blocks the first
        # computed, or not, as the two are scheduled; asked again, each reads its full blocks but the one
        # holding its last token
        assert again["prompt_tokens_details"]["cached_tokens"] == (prompt - 1) // block * block + \
            (again["prompt_tokens"] - prompt - 1) // block * block
        assert first["prompt_tokens_details"]["cached_tokens"] <= prompt // block * block
        stream = httpx.post(f"{running.url}/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}).text
        usage = json.loads(stream.split("data: ")[-2])["usage"]
        assert set(usage["prompt_tokens_details"]) == {"cached_tokens"}
    finally:
        running.close()
    plain = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": "the cat", "max_tokens": 1}).json()
    assert "usage" in plain, plain
    assert "prompt_tokens_details" not in plain["usage"]  # vLLM's default: not given


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
    "metadata": {"k": "v"}, "stream_options": {"include_obfuscation": False}, "max_output_tokens": 4}


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
    from rast_engine.server.protocol import parse_request
    from rast_engine.server.responses_api.protocol import ResponsesRequest

    body = _replaced(RICH, where, new)
    if then is not None and then[0] in _paths(body):  # the first replacement may have taken it away
        body = _replaced(body, *then)
    try:
        parse_request(json.dumps(body).encode(), ResponsesRequest).to_chat([])
    except APIError as exc:
        assert exc.status == 400 and exc.param, exc.message
