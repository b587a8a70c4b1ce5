"""The Starlette app: OpenAI routes over an AsyncEngine. Every failure a client can cause is answered
with an OpenAI error body and the server keeps serving; a stream or a request whose client goes away
is aborted in the engine, which frees its KV blocks."""
from __future__ import annotations

import contextlib
import hmac
import logging
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rast_engine import __version__
from rast_engine.errors import RastError
from rast_engine.sampling_params import SamplingParams
from rast_engine.server import MAX_REQUEST_BYTES, checked_api_key
from rast_engine.server.async_engine import AsyncEngine
from rast_engine.server.beam_route import beam_params, beam_search_response
from rast_engine.server.chunk_stream import chunk_stream
from rast_engine.server.chat_messages import render_chat
from rast_engine.server.chat_output import Reasoning
from rast_engine.server.http_io import SSEResponse, too_large, unless_client_leaves
from rast_engine.server.lora_routes import lora_routes
from rast_engine.server.weight_routes import weight_routes
from rast_engine.server.metrics import CONTENT_TYPE, Metrics
from rast_engine.server.processor_names import compiled_pattern
from rast_engine.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from rast_engine.server.request_json import parse_request
from rast_engine.server.request_handle import RequestHandle
from rast_engine.server.request_params import chat_params, completion_params, echoed
from rast_engine.server.responses import Formatter
from rast_engine.server.responses_api.routes import responses_routes
from rast_engine.server.responses_api.store import ResponseStore
from rast_engine.server.tokenizer_routes import tokenizer_routes
from rast_engine.server.tools import PARSERS as TOOL_PARSERS
from rast_engine.structured import engine_grammars

log = logging.getLogger("rast.server")
Handler = Callable[[Request], Awaitable[Response]]


class OpenAIServer:
    def __init__(self, engine: Any, *, model_name: str | Sequence[str], api_key: str | None = None,
                 max_waiting: int = 512, queue_timeout: float | None = None,
                 max_request_bytes: int = MAX_REQUEST_BYTES, tool_call_parser: str | None = None,
                 responses_store_size: int = 1000, enable_prompt_tokens_details: bool = False,
                 logits_processor_pattern: str | None = None) -> None:
        if max_request_bytes < 1:
            raise RastError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
        self.max_request_bytes = max_request_bytes
        if tool_call_parser is not None and tool_call_parser not in TOOL_PARSERS:
            raise RastError(f"tool_call_parser must be one of {TOOL_PARSERS} or None, got {tool_call_parser!r}")
        self.tool_call_parser = tool_call_parser  # None: "auto" tool choice is off, as vLLM's default
        # vLLM's --served-model-name: requests may name any of them, responses carry the first
        self.model_names = (model_name,) if isinstance(model_name, str) else tuple(model_name)
        if not self.model_names or not all(isinstance(n, str) and n for n in self.model_names):
            raise RastError(f"model_name must be a non-empty name or a list of them, got {model_name!r}")
        self.model_name = self.model_names[0]
        self.api_key = checked_api_key(api_key)
        # vLLM's --lora-modules: a request naming an adapter decodes with it as its RL model
        clash = sorted(set(engine.lora_adapters()) & set(self.model_names))
        if clash:
            raise RastError(f"the LoRA module name(s) {clash} are also served model names; rename one")
        self.metrics = Metrics(self.model_name)
        self.engine = AsyncEngine(engine, max_waiting=max_waiting, queue_timeout=queue_timeout,
                                  on_step=self.metrics.step_seconds.observe)
        self.metrics.watch(self.engine)
        self.tokenizer = engine.tokenizer
        self.reasoning_parser = engine.config.reasoning_parser  # chat responses split by it
        self.responses = ResponseStore(responses_store_size)  # /v1/responses with store: true
        self.prompt_details = enable_prompt_tokens_details  # vLLM's: usage.prompt_tokens_details.cached_tokens
        self.processor_pattern = compiled_pattern(logits_processor_pattern)  # vLLM V0's: names requests may load

    def app(self) -> Starlette:
        routes = [
            Route("/v1/models", self._wrap("models", self.models, auth=True), methods=["GET"]),
            Route("/v1/completions", self._wrap("completions", self.completions, auth=True),
                  methods=["POST"]),
            Route("/v1/chat/completions", self._wrap("chat", self.chat, auth=True), methods=["POST"]),
            *tokenizer_routes(self),
            Route("/health", self._wrap("health", self.health), methods=["GET"]),
            Route("/ping", self._wrap("ping", self.health), methods=["GET", "POST"]),  # vLLM's (SageMaker's) probe
            Route("/version", self._wrap("version", self.version), methods=["GET"]),
            Route("/metrics", self._wrap("metrics", self.render_metrics), methods=["GET"]),
            *responses_routes(self),
            *lora_routes(self),
            *weight_routes(self),
        ]

        @contextlib.asynccontextmanager
        async def lifespan(_: Starlette) -> AsyncIterator[None]:
            self.engine.start()
            try:
                yield
            finally:
                self.engine.stop()

        async def http_error(_: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            err = APIError(exc.status_code, str(exc.detail), code=str(exc.status_code))
            return JSONResponse(err.body(), status_code=exc.status_code)

        return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})

    # ---- plumbing ----
    def _wrap(self, name: str, fn: Handler, auth: bool = False) -> Handler:
        async def handler(request: Request) -> Response:
            try:
                if auth:
                    self._authorize(request)
                response = await fn(request)
            except APIError as exc:
                response = JSONResponse(exc.body(), status_code=exc.status)
            except ClientDisconnect:  # gone while its body was read: nobody to answer, nothing failed
                response = Response(status_code=499)
            except Exception as exc:  # noqa: BLE001 - a bug answers 500, the server keeps serving
                log.exception("internal error in %s", name)
                err = APIError(500, f"internal server error: {exc!r}", type="server_error")
                response = JSONResponse(err.body(), status_code=500)
            self.metrics.requests.labels(name, str(response.status_code)).inc()
            return response
        return handler

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        # the header's raw bytes (Starlette decodes them as Latin-1) against the key's UTF-8
        given = request.headers.get("authorization", "").encode("latin-1")
        if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        """The request's body, refused (413) once it is known to exceed max_request_bytes: from its
        Content-Length before anything is read, else while it streams in, so an oversized body never
        sits in memory whole."""
        limit = self.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(int(declared), limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large(len(body), limit)
        return bytes(body)

    def _check_model(self, model: str) -> str | None:
        """The request's LoRA adapter (None: a served model name, M alone); a 404 for an unknown name."""
        adapters = self.engine.engine.lora_adapters()  # live: adapters load and unload while serving
        if model in adapters:
            return model
        if model not in self.model_names:
            served = ", ".join(map(repr, (*self.model_names, *adapters)))
            raise APIError(404, f"model {model!r} does not exist; this server serves {served}", param="model",
                           code="model_not_found")

    # ---- routes ----
    async def models(self, request: Request) -> Response:
        cards = [{"id": name, "object": "model", "created": 0, "owned_by": "rast"} for name in self.model_names]
        cards += [{"id": name, "object": "model", "created": 0, "owned_by": "rast", "root": path,
                   "parent": self.model_name} for name, path in self.engine.engine.lora_adapters().items()]
        return JSONResponse({"object": "list", "data": cards})

    async def health(self, request: Request) -> Response:
        if self.engine.error is not None:
            raise APIError(503, f"the engine failed: {self.engine.error!r}", type="server_error", code="engine_dead")
        return JSONResponse({"status": "ok"})

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": __version__})  # vLLM's route and body, with rast's version

    async def render_metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = parse_request(await self._body(request), CompletionRequest)
        lora = self._check_model(req.model)
        if req.echo and self.tokenizer is None:
            raise APIError(400, "echo returns the prompt's text, and this model has no tokenizer "
                                "(load_format='dummy')", param="echo")
        rid = f"cmpl-{uuid.uuid4().hex}"
        beams = beam_params(req, req.max_tokens)
        if beams is not None:
            prompts = req.prompts()
            fmt = Formatter("completion", rid, lora or self.model_name, [f"{rid}-{i}" for i in range(len(prompts))],
                            req.n, self.tokenizer, beams.logprobs, return_token_ids=req.return_token_ids,
                            token_ids_as_text=req.return_tokens_as_token_ids)
            return await beam_search_response(self, request, fmt, prompts, beams, add_special_tokens=True,
                                              param="prompt", priority=req.priority, lora=lora,
                                              cache_salt=req.cache_salt)
        params = completion_params(req, self.engine.engine, self.processor_pattern)
        await self._precompile(params)
        handle = self.engine.submit(req.prompts(), params, request_id=rid, max_tokens=req.max_new_tokens(),
                                    priority=req.priority, lora=lora, cache_salt=req.cache_salt)
        fmt = Formatter("completion", rid, lora or self.model_name, handle.request_ids, req.n, self.tokenizer,
                        req.logprobs, echo=echoed(req) if req.echo else None, prompt_logprobs=req.prompt_logprobs,
                        generates=req.max_tokens != 0, token_ids_as_text=req.return_tokens_as_token_ids,
                        prompt_details=self.prompt_details, return_token_ids=req.return_token_ids)
        return await self._respond(request, handle, fmt, req.stream,
                                   lambda first, arrival: chunk_stream(handle, fmt, first, req, arrival, self.metrics))

    async def chat(self, request: Request) -> Response:
        req: ChatCompletionRequest = parse_request(await self._body(request), ChatCompletionRequest)
        lora, rid = self._check_model(req.model), f"chatcmpl-{uuid.uuid4().hex}"
        beams = beam_params(req, req.max_new_tokens())
        if beams is not None:
            text = await self.render(req)
            return await beam_search_response(self, request, self.chat_formatter(req, rid, lora, [rid], text), [text],
                                              beams, add_special_tokens=False, param="messages",
                                              priority=req.priority, lora=lora, cache_salt=req.cache_salt)
        handle, fmt = await self.start_chat(req, lora, rid, "messages")
        return await self._respond(request, handle, fmt, req.stream,
                                   lambda first, arrival: chunk_stream(handle, fmt, first, req, arrival, self.metrics))

    async def render(self, req: ChatCompletionRequest) -> str:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions")
        return await self.engine.in_tokenizer_thread(render_chat, self.tokenizer, req.messages,
                                                     req.add_generation_prompt, req.chat_template_kwargs,
                                                     req.continue_final_message, req.tools)

    def chat_formatter(self, req: ChatCompletionRequest, rid: str, lora: str | None, request_ids: list[str],
                       text: str) -> Formatter:
        reasoning = None if self.reasoning_parser is None else Reasoning.of(self.reasoning_parser, text,
                                                                             req.include_reasoning)
        return Formatter("chat", rid, lora or self.model_name, request_ids, req.n, self.tokenizer,
                         req.logprobs_count(), prompt_logprobs=req.prompt_logprobs, reasoning=reasoning,
                         tools=req.tool_mode(), token_ids_as_text=req.return_tokens_as_token_ids,
                         prompt_details=self.prompt_details, return_token_ids=req.return_token_ids)

    async def start_chat(self, req: ChatCompletionRequest, lora: str | None, rid: str,
                         param: str) -> tuple[RequestHandle, Formatter]:
        """The chat request's engine request, submitted (admitted on entering the handle), and the Formatter
        of its outputs; shared by /v1/chat/completions and /v1/responses (``param``: the field the prompt
        came from)."""
        tools = req.tool_mode()
        if tools is not None and tools.kind == "auto" and self.tool_call_parser is None:
            raise APIError(400, '"auto" tool choice (the default with tools) needs rast serve --enable-auto-tool-choice '
                                '--tool-call-parser hermes; or send tool_choice "none", "required" or a named function',
                           param="tool_choice")
        params = chat_params(req, self.engine.engine, self.processor_pattern)
        await self._precompile(params)
        text = await self.render(req)
        # The template already holds the special tokens (BOS etc.); do not add them a second time.
        handle = self.engine.submit([text], params, request_id=rid, max_tokens=req.max_new_tokens(),
                                    add_special_tokens=False, param=param, priority=req.priority, lora=lora,
                                    cache_salt=req.cache_salt)
        return handle, self.chat_formatter(req, rid, lora, handle.request_ids, text)

    async def _precompile(self, params: SamplingParams) -> None:
        """Compiles a structured-output constraint on a worker thread (structured.engine_grammars)."""
        if params.structured_outputs is not None:
            try:
                await self.engine.in_worker_thread(
                    lambda: engine_grammars(self.engine.engine).compile(params.structured_outputs))
            except RastError as exc:
                raise APIError(400, str(exc), param=exc.param) from None

    async def _respond(self, request: Request, handle: RequestHandle, fmt: Any, stream: bool,
                       events: Callable[[Any, float], AsyncIterator[str]]) -> Response:
        """Admits the handle's requests, then answers with ``fmt.body()`` once all finished, or with the
        stream ``events(first output, arrival time)``; ``fmt`` folds outputs in (``add``)."""
        arrival = time.perf_counter()
        stayed, _ = await unless_client_leaves(request, handle.__aenter__())  # held while the server is paused
        if not stayed:  # its admission was cancelled, which aborted it
            return Response(status_code=499)
        streaming = False
        try:
            # Wait for the first output before answering, so a queue timeout or an engine failure is
            # still a proper HTTP error rather than a broken stream.
            stayed, first = await unless_client_leaves(request, handle.__anext__())
            if not stayed:
                return Response(status_code=499)
            self.metrics.first_token(time.perf_counter() - arrival)
            if stream:
                streaming = True  # the response owns the handle from here and closes it
                return SSEResponse(events(first, arrival), handle)
            fmt.add(first)
            stayed, _ = await unless_client_leaves(request, self._drain(handle, fmt))
            if not stayed:
                return Response(status_code=499)
        finally:
            if not streaming:  # aborts whatever is unfinished, e.g. after a disconnect
                await handle.__aexit__(None, None, None)
        self.metrics.finished(time.perf_counter() - arrival, fmt.finish_reasons())
        return JSONResponse(fmt.body())

    @staticmethod
    async def _drain(handle: RequestHandle, fmt: Any) -> None:
        async for out in handle:
            fmt.add(out)
