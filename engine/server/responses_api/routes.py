"""The Responses API's routes: create (``POST /v1/responses``, whole, streamed or in the background),
retrieve, delete and cancel a stored response."""
from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rast_engine.sampling_params import SamplingParams
from rast_engine.server.api_error import APIError
from rast_engine.server.request_json import parse_request
from rast_engine.server.responses_api.background import BackgroundResponses
from rast_engine.server.responses_api.input_items import input_messages
from rast_engine.server.responses_api.output import ResponseOutput
from rast_engine.server.responses_api.protocol import ResponsesRequest, as_responses_error
from rast_engine.server.responses_api.store import StoredResponse

if TYPE_CHECKING:
    from rast_engine.server.app import OpenAIServer


def _head(req: Any, params: SamplingParams, response_id: str, model: str, stored: bool) -> dict[str, Any]:
    """The response's fields that do not change while it runs: the request's settings as they apply (the
    temperature and top_p used, the generation config's where the request gave none)."""
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
    return {"id": response_id, "object": "response", "created_at": int(time.time()), "model": model,
            "error": None, "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {}, "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": stored, "temperature": params.temperature, "top_p": params.top_p,
            "text": {"format": (req.text or {}).get("format") or {"type": "text"}}, "tool_choice": choice,
            "tools": req.tools or [], "top_logprobs": req.top_logprobs or 0, "truncation": "disabled",
            "user": req.user, "background": req.background, "service_tier": "default",
            "prompt_cache_key": req.prompt_cache_key, "safety_identifier": req.safety_identifier}


def responses_routes(server: OpenAIServer) -> list[Route]:
    store = server.responses
    background = BackgroundResponses(server.metrics)

    def conversation(req: Any) -> list[dict[str, Any]]:
        """The stored input items that previous_response_id continues (404 where none is kept)."""
        if req.previous_response_id is None:
            return []
        previous = store.get(req.previous_response_id)
        if previous is None:
            raise APIError(404, f"previous response {req.previous_response_id!r} was not found: it was not stored, "
                                f"was deleted, or was forgotten (this server keeps the last {store.capacity})",
                           param="previous_response_id", code="response_not_found")
        if previous.body["status"] in ("queued", "in_progress"):
            raise APIError(400, f"previous response {req.previous_response_id!r} is still in progress; continue it "
                                "once it has ended", param="previous_response_id")
        return previous.conversation

    async def create(request: Request) -> Response:
        req = parse_request(await server._body(request), ResponsesRequest)
        lora = server._check_model(req.model)
        before = conversation(req)
        chat = req.to_chat(input_messages(before) if before else [])
        if req.wants_logprobs() and (server.reasoning_parser is not None or chat.tool_mode() is not None):
            raise APIError(400, "logprobs come on the one message of a response; with a reasoning parser or tools "
                                "the output's tokens would be split between items, which this server does not do",
                           param="include")
        if req.background and store.capacity == 0:
            raise APIError(400, "background responses are polled from the store, which this server keeps none in "
                                "(--responses-store-size 0)", param="background")
        response_id = f"resp_{uuid.uuid4().hex}"
        try:
            handle, fmt = await server.start_chat(chat, lora, response_id, "input")
        except APIError as exc:
            raise as_responses_error(exc) from None
        stored = req.store and store.capacity > 0
        out = ResponseOutput(fmt, _head(req, handle.params, response_id, lora or server.model_name, stored))
        given = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input

        def keep(**change: Any) -> dict[str, Any]:
            """Stores the response as it stands (``change``: fields an ending sets itself)."""
            body = {**out.body(), **change}
            if stored:
                store.put(response_id, StoredResponse(body, before + given + body["output"]))
            return body

        if req.background:
            return JSONResponse(await background.start(response_id, handle, out, keep))

        async def events(first: Any, arrival: float) -> AsyncIterator[str]:
            yield out.sse(out.opening())
            try:
                output = first
                while True:
                    yield out.sse(out.add(output))
                    if handle.done:
                        break
                    output = await handle.__anext__()
                server.metrics.finished(time.perf_counter() - arrival, out.finish_reasons())
                closing = out.closing()
                keep()
                yield out.sse(closing)
            except APIError as exc:
                yield out.sse([{"type": "error", "message": exc.message, "code": exc.code, "param": exc.param}])

        answer = await server._respond(request, handle, out, req.stream, events)
        if not req.stream and answer.status_code == 200:
            keep()
        return answer

    def stored_response(request: Request) -> tuple[str, StoredResponse]:
        response_id = request.path_params["response_id"]
        found = store.get(response_id)
        if found is None:
            raise APIError(404, f"response {response_id!r} was not found (not stored, deleted or forgotten)",
                           param="response_id", code="response_not_found")
        return response_id, found

    async def retrieve(request: Request) -> Response:
        return JSONResponse(stored_response(request)[1].body)

    async def cancel(request: Request) -> Response:
        response_id, found = stored_response(request)
        if not await background.cancel(response_id):
            raise APIError(400, f"response {response_id!r} is {found.body['status']}; only a background response in "
                                "progress can be cancelled", param="response_id")
        return JSONResponse(stored_response(request)[1].body)

    async def delete(request: Request) -> Response:
        response_id, _ = stored_response(request)
        await background.cancel(response_id)  # one in progress would store itself again at its end
        store.delete(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    return [Route("/v1/responses", server._wrap("responses", create, auth=True), methods=["POST"]),
            Route("/v1/responses/{response_id}", server._wrap("retrieve_response", retrieve, auth=True),
                  methods=["GET"]),
            Route("/v1/responses/{response_id}", server._wrap("delete_response", delete, auth=True),
                  methods=["DELETE"]),
            Route("/v1/responses/{response_id}/cancel", server._wrap("cancel_response", cancel, auth=True),
                  methods=["POST"])]

