"""HTTP plumbing of the routes: server-sent events, a stream that always closes its request handle, the
race between a request's work and its client leaving, and the request-size refusal."""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse

from rast_engine.server.api_error import APIError
from rast_engine.server.request_handle import RequestHandle

T = TypeVar("T")


class SSEResponse(StreamingResponse):
    """A stream that always closes its handle, even when the client leaves before the first byte
    (Starlette then cancels the body iterator, which may never have started)."""

    def __init__(self, content: AsyncIterator[str], handle: RequestHandle) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.handle = handle

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.handle.__aexit__(None, None, None)


def too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"request body of {size} bytes or more exceeds this server's limit of {limit} bytes "
                         "(--max-request-bytes)", code="request_too_large")


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """(True, result) of `work`, or (False, None) with `work` cancelled if the client leaves first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        stayed = task.done()
        if not stayed:
            task.cancel()
    return (True, task.result()) if stayed else (False, None)
