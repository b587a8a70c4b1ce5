"""The routes of tokenize.py's /tokenize, /detokenize and /tokenizer_info, run on the tokenizer thread."""
from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rast_engine.server.request_json import parse_request
from rast_engine.server.tokenize import DetokenizeRequest, TokenizeRequest, detokenize, tokenize, tokenizer_info

if TYPE_CHECKING:
    from rast_engine.server.app import OpenAIServer


def tokenizer_routes(server: OpenAIServer) -> list[Route]:
    engine = server.engine

    async def tokenize_route(request: Request) -> Response:
        req: TokenizeRequest = parse_request(await server._body(request), TokenizeRequest)
        if req.model is not None:
            server._check_model(req.model)
        return JSONResponse(await engine.in_tokenizer_thread(tokenize, server.tokenizer, req, engine.max_model_len))

    async def detokenize_route(request: Request) -> Response:
        req: DetokenizeRequest = parse_request(await server._body(request), DetokenizeRequest)
        if req.model is not None:
            server._check_model(req.model)
        return JSONResponse(await engine.in_tokenizer_thread(detokenize, server.tokenizer, req,
                                                             engine.engine.vocab_size))

    async def info_route(request: Request) -> Response:
        return JSONResponse(await engine.in_tokenizer_thread(tokenizer_info, server.tokenizer, engine.max_model_len,
                                                             engine.engine.vocab_size))

    return [Route("/tokenize", server._wrap("tokenize", tokenize_route, auth=True), methods=["POST"]),
            Route("/detokenize", server._wrap("detokenize", detokenize_route, auth=True), methods=["POST"]),
            Route("/tokenizer_info", server._wrap("tokenizer_info", info_route, auth=True), methods=["GET"])]
