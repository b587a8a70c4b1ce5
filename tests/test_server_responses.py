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
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

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
