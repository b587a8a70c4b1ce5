"""Responses created with ``background: true``: admitted while the POST waits (so a bad prompt is still its
400), then run as a task on the event loop; the POST answers at once with the ``in_progress`` body.

The store holds the response as it stands: ``in_progress``, then its end (``completed``, ``incomplete``,
``failed`` with its error, or ``cancelled``); GET polls it and ``POST /v1/responses/{id}/cancel`` aborts the
engine requests of one in progress. A response stays in progress until its task has stored its end, so a
poll never sees a response that is neither running nor ended.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from rast_engine.server.api_error import APIError
from rast_engine.server.metrics import Metrics
from rast_engine.server.request_handle import RequestHandle
from rast_engine.server.responses_api.output import ResponseOutput

Keep = Callable[..., dict[str, Any]]  # stores the response as it stands, with the fields given changed


class BackgroundResponses:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.tasks: dict[str, asyncio.Task] = {}

    async def start(self, response_id: str, handle: RequestHandle, out: ResponseOutput, keep: Keep) -> dict[str, Any]:
        arrival = time.perf_counter()
        await handle.__aenter__()  # admission: its errors answer the POST
        body = keep()  # in_progress
        self.tasks[response_id] = asyncio.ensure_future(self._run(response_id, handle, out, keep, arrival))
        return body

    async def _run(self, response_id: str, handle: RequestHandle, out: ResponseOutput, keep: Keep,
                   arrival: float) -> None:
        try:
            async for output in handle:
                out.add(output)
            out.closing()
            keep()
            self.metrics.finished(time.perf_counter() - arrival, out.finish_reasons())
        except asyncio.CancelledError:
            keep(status="cancelled", output=[], usage=None)
        except APIError as exc:
            keep(status="failed", output=[], usage=None, error={"code": "server_error", "message": exc.message})
        finally:
            await handle.__aexit__(None, None, None)  # aborts what is unfinished
            self.tasks.pop(response_id, None)

    async def cancel(self, response_id: str) -> bool:
        """Cancels the response's task and waits for it to store its end; False where none runs."""
        task = self.tasks.get(response_id)
        if task is None:
            return False
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return True
