"""Routes that change what a running server's models hold, off unless the operator turns them on, since
anyone who may call the API could otherwise make the server read files from its disk or slow every
prompt down:

- POST /v1/load_weights {"path", "role"} (rast's; $RAST_ALLOW_RUNTIME_WEIGHT_UPDATING): another checkpoint
  of one model written in place (LLMEngine.load_weights, engine/weight_updates.py), e.g. a new RL
  checkpoint of R while M stays loaded. Refused (409) while requests are in flight, whose KV came from
  the old weights: drain the server first (stop sending, wait for the open requests).
- POST /reset_prefix_cache (vLLM's dev-mode route; $VLLM_SERVER_DEV_MODE or $RAST_SERVER_DEV_MODE): the
  prefix cache forgotten, as benchmarks do between runs; 409 while requests hold blocks.
- POST /pause?mode=abort|wait|keep&clear_cache=true, POST /resume, GET /is_paused (vLLM's dev-mode routes;
  on with either variable above): the fence around a load while requests are in flight (pause_control.py,
  engine/pausing.py); paused, /v1/load_weights is allowed, and requests kept ("keep") go on with the new
  weights after /resume.
- POST /sleep?level=1|2, POST /wake_up?tags=weights&tags=kv_cache, GET /is_sleeping (vLLM's dev-mode
  routes, on as /pause): the device memory of the weights and KV cache given back and taken again
  (engine/sleep_mode.py); 409 while requests are in flight. Requests sent meanwhile wait for the wake.
All run on the engine thread between two steps.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rast_engine.errors import RastError
from rast_engine.server.protocol import APIError
from rast_engine.server.request_json import parse_request

if TYPE_CHECKING:
    from rast_engine.server.app import OpenAIServer

WEIGHT_FLAGS = ("RAST_ALLOW_RUNTIME_WEIGHT_UPDATING",)
DEV_FLAGS = ("RAST_SERVER_DEV_MODE", "VLLM_SERVER_DEV_MODE")


class LoadWeightsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1)
    role: str = "small_rl"


def _on(flags: tuple[str, ...]) -> bool:
    return any(os.environ.get(f, "").strip().lower() in ("1", "true") for f in flags)


def weight_routes(server: OpenAIServer) -> list[Route]:
    """The routes the environment turns on (module docstring)."""
    engine = server.engine

    async def load_weights(request: Request) -> Response:
        req: LoadWeightsRequest = parse_request(await server._body(request), LoadWeightsRequest)
        written: list[int] = []

        def load() -> None:
            if engine.engine.has_unfinished_requests() and not engine.engine.is_paused():
                raise APIError(409, f"{len(engine.engine.groups)} requests are in flight; their KV came from the "
                                    "old weights: POST /pause first (mode=keep to go on with them after the load)",
                               code="busy")
            written.append(engine.engine.load_weights(path=req.path, role=req.role))

        await _on_engine(server, load, "path")
        return JSONResponse({"path": req.path, "role": req.role, "tensors": written[0]})

    async def reset_prefix_cache(_: Request) -> Response:
        def reset() -> None:
            if not engine.engine.reset_prefix_cache():
                raise APIError(409, "requests in flight hold prefix-cache blocks; reset once they finish",
                               code="busy")

        await _on_engine(server, reset, None)
        return Response(status_code=200)

    async def pause(request: Request) -> Response:
        query = request.query_params
        mode = query.get("mode", "wait" if _flag(query, "wait_for_inflight_requests", False) else "abort")
        await engine.pause_generation(mode=mode, clear_cache=_flag(query, "clear_cache", True))
        return JSONResponse({"status": "paused"})

    async def resume(_: Request) -> Response:
        await engine.resume_generation()
        return JSONResponse({"status": "resumed"})

    async def is_paused(_: Request) -> Response:
        return JSONResponse({"is_paused": engine.is_paused()})

    async def sleep(request: Request) -> Response:
        level = request.query_params.get("level", "1")
        if level not in ("1", "2"):
            raise APIError(400, f"level must be 1 or 2, got {level!r}", param="level")

        def go() -> None:
            if engine.engine.has_unfinished_requests():
                raise APIError(409, f"{len(engine.engine.groups)} requests are in flight and sleep discards their "
                                    "KV cache: POST /pause (mode=abort or wait) first", code="busy")
            engine.engine.sleep(int(level))

        await _on_engine(server, go, "level")
        return Response(status_code=200)

    async def wake_up(request: Request) -> Response:
        tags = request.query_params.getlist("tags") or None
        await _on_engine(server, lambda: engine.engine.wake_up(tags), "tags")
        return Response(status_code=200)

    async def is_sleeping(_: Request) -> Response:
        return JSONResponse({"is_sleeping": engine.engine.is_sleeping()})

    routes = []
    if _on(WEIGHT_FLAGS) or _on(DEV_FLAGS):
        routes += [Route("/sleep", server._wrap("sleep", sleep, auth=True), methods=["POST"]),
                   Route("/wake_up", server._wrap("wake_up", wake_up, auth=True), methods=["POST"]),
                   Route("/is_sleeping", server._wrap("is_sleeping", is_sleeping, auth=True), methods=["GET"])]
        routes += [Route("/pause", server._wrap("pause", pause, auth=True), methods=["POST"]),
                   Route("/resume", server._wrap("resume", resume, auth=True), methods=["POST"]),
                   Route("/is_paused", server._wrap("is_paused", is_paused, auth=True), methods=["GET"])]
    if _on(WEIGHT_FLAGS):
        routes.append(Route("/v1/load_weights", server._wrap("load_weights", load_weights, auth=True),
                            methods=["POST"]))
    if _on(DEV_FLAGS):
        routes.append(Route("/reset_prefix_cache", server._wrap("reset_prefix_cache", reset_prefix_cache, auth=True),
                            methods=["POST"]))
    return routes


def _flag(query: Any, name: str, default: bool) -> bool:
    """A boolean query parameter, as FastAPI reads one (vLLM's routes)."""
    value = query.get(name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise APIError(400, f"{name} must be true or false, got {value!r}", param=name)


async def _on_engine(server: OpenAIServer, fn: Callable[[], None], param: str | None) -> None:
    """``fn`` on the engine thread; its RastError is the caller's 400."""
    try:
        await server.engine.on_engine_thread(fn)
    except RastError as exc:
        raise APIError(400, str(exc), param=exc.param or param) from None
