"""vLLM's runtime LoRA routes: POST /v1/load_lora_adapter {"lora_name", "lora_path"} and POST
/v1/unload_lora_adapter {"lora_name"}, served only when $VLLM_ALLOW_RUNTIME_LORA_UPDATING (or
$RAST_ALLOW_RUNTIME_LORA_UPDATING) is true, as vLLM gates them: anyone who may call the API could
otherwise load files from the server's disk. The engine (rast serve --small-base with --lora-modules or
--max-loras) loads the adapter into a free slot between two steps (engine/lora_registry.py); requests then
name it as their model. Answers are vLLM's plain-text lines; a refusal is a 400 saying why.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

from pydantic import BaseModel, ConfigDict, StrictInt
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from rast_engine.errors import RastError
from rast_engine.server.protocol import APIError
from rast_engine.server.request_json import parse_request

if TYPE_CHECKING:
    from rast_engine.server.app import OpenAIServer

FLAGS = ("RAST_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: StrictInt | None = None  # vLLM's body may carry it; adapters are known by name here


def runtime_updating() -> bool:
    return any(os.environ.get(f, "").strip().lower() in ("1", "true") for f in FLAGS)


def lora_routes(server: OpenAIServer) -> list[Route]:
    """The two routes, or none unless runtime updating is allowed."""
    if not runtime_updating():
        return []

    async def run(fn: Callable[[], None], param: str) -> None:
        try:
            await server.engine.on_engine_thread(fn)
        except RastError as exc:
            raise APIError(400, str(exc), param=exc.param or param) from None

    async def load(request: Request) -> Response:
        req: LoadLoraRequest = parse_request(await server._body(request), LoadLoraRequest)
        if req.lora_name in server.model_names:
            raise APIError(400, f"{req.lora_name!r} is a served model name", param="lora_name")
        await run(lambda: server.engine.engine.load_lora_adapter(req.lora_name, req.lora_path), "lora_path")
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    async def unload(request: Request) -> Response:
        req: UnloadLoraRequest = parse_request(await server._body(request), UnloadLoraRequest)
        await run(lambda: server.engine.engine.unload_lora_adapter(req.lora_name), "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    return [Route("/v1/load_lora_adapter", server._wrap("load_lora_adapter", load, auth=True), methods=["POST"]),
            Route("/v1/unload_lora_adapter", server._wrap("unload_lora_adapter", unload, auth=True),
                  methods=["POST"])]
