"""Offline batches in the OpenAI Batch API's file format, answered by the same handlers `rast serve` runs,
in process, as vLLM's `run-batch` does.

Each input line is ``{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions",
"/v1/completions" or "/v1/responses", "body": {...}}``; each output line is ``{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}``, with the server's response as ``body`` and, when it failed, its error
object as ``error`` too (null on success), so both OpenAI's and vLLM's readers of batch output find it.

Invariants:
- one output line per non-blank input line, in input order, whatever happens to the others: a line that
  is not JSON, names another endpoint or asks for a stream gets an error line without reaching the
  engine, and a request the server refuses gets the server's own error;
- requests run concurrently, so the engine batches them, but never more prompts in flight than the
  server admits (max_num_seqs + max_waiting), so no line is refused for load (429); and no line starts
  more than ``window`` lines ahead of the first unwritten one, so answers held for the output's order
  stay bounded in memory however long the file.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from typing import Any, Callable, Iterable

import httpx
from pydantic import TypeAdapter, ValidationError

from rast_engine.server.app import OpenAIServer
from rast_engine.server.protocol import APIError

log = logging.getLogger("rast.run_batch")
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
PROGRESS_SECONDS = 10.0
_BOOL = TypeAdapter(bool)


@dataclasses.dataclass
class BatchSummary:
    lines: int = 0
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    engine_error: BaseException | None = None  # the engine died: the lines after it failed with 503


@dataclasses.dataclass
class _Line:
    """A parsed input line; ``error`` set when it cannot be sent."""
    custom_id: Any
    url: str = ""
    body: bytes = b""
    prompts: int = 1
    error: APIError | None = None


def parse_line(raw: str | bytes, number: int) -> _Line:
    try:
        item = json.loads(raw)
    except ValueError as exc:  # not JSON or not UTF-8, or an integer past Python's 4300-digit limit
        return _Line(None, error=APIError(400, f"line {number} is not JSON: {exc}"))
    except RecursionError:  # as the server answers such a body
        return _Line(None, error=APIError(400, f"line {number} is nested too deeply"))
    if not isinstance(item, dict):
        return _Line(None, error=APIError(400, f"line {number} is not a JSON object"))
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str):
        return _Line(custom_id, error=APIError(400, f"line {number}: custom_id must be a string", param="custom_id"))
    method, url, body = item.get("method", "POST"), item.get("url"), item.get("body")
    if method != "POST":
        return _Line(custom_id, error=APIError(400, f"line {number}: method must be POST, got {method!r}",
                                               param="method"))
    if url not in ENDPOINTS:
        return _Line(custom_id, error=APIError(400, f"line {number}: url {url!r} is not served; a batch may "
                                                    f"send {' or '.join(ENDPOINTS)}", param="url"))
    if not isinstance(body, dict):
        return _Line(custom_id, error=APIError(400, f"line {number}: body must be a JSON object", param="body"))
    if _streams(body.get("stream")):
        return _Line(custom_id, error=APIError(400, f"line {number}: a batch request cannot stream", param="stream"))
    if url == "/v1/responses" and _streams(body.get("background")):  # its line would hold an unfinished response
        return _Line(custom_id, error=APIError(400, f"line {number}: a batch request cannot run in the background",
                                               param="background"))
    prompt = body.get("prompt") if url == "/v1/completions" else None
    # the completions route takes a list of prompts (strings or token-id lists) as as many requests
    prompts = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else 1
    try:
        return _Line(custom_id, url, json.dumps(body).encode(), prompts)
    except RecursionError:
        return _Line(custom_id, error=APIError(400, f"line {number}: body is nested too deeply", param="body"))


def _streams(value: Any) -> bool:
    """Whether the server would read ``stream`` as true (pydantic's lax bool: "true", "on", 1 too); a value
    it would refuse is left for its own error."""
    try:
        return _BOOL.validate_python(value) if value is not None else False
    except ValidationError:
        return False


def _output(line: _Line, status: int, body: dict[str, Any]) -> str:
    out = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id,
           "response": {"status_code": status, "request_id": f"rast-batch-{uuid.uuid4().hex}", "body": body},
           "error": None if status == 200 else body.get("error", body)}
    text = json.dumps(out, ensure_ascii=False)
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate the server sent escaped: keep it escaped
        text = json.dumps(out)
    return text


class _Gate:
    """Admits a line while the prompts in flight stay within ``capacity`` and it is within ``window`` lines
    of the first unwritten one."""

    def __init__(self, capacity: int, window: int) -> None:
        self.capacity, self.window, self.in_flight = capacity, window, 0
        self.changed = asyncio.Condition()

    async def enter(self, prompts: int, ahead: Callable[[], int]) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.in_flight + prompts <= self.capacity and ahead() < self.window)
            self.in_flight += prompts

    async def leave(self, prompts: int) -> None:
        async with self.changed:
            self.in_flight -= prompts
            self.changed.notify_all()


async def run_batch(server: OpenAIServer, lines: Iterable[str | bytes], write: Callable[[str], None], *,
                    window: int | None = None) -> BatchSummary:
    """Answer every request of ``lines`` (an input file's lines) and ``write`` one output line for each, in
    order, as soon as it and every line before it are answered."""
    capacity = server.engine.capacity
    gate = _Gate(capacity, window if window is not None else 8 * capacity)
    summary, answered, written, started = BatchSummary(), {}, 0, time.monotonic()
    app = server.app()

    def flush() -> None:
        nonlocal written
        while written in answered:
            write(answered.pop(written))
            written += 1

    async def answer(seq: int, number: int, line: _Line, client: httpx.AsyncClient) -> None:
        """The answer to input line ``number``, written as output line ``seq``."""
        try:
            if line.error is not None:
                status, body = line.error.status, line.error.body()
            else:
                response = await client.post(line.url, content=line.body,
                                             headers={"content-type": "application/json"})
                status, body = response.status_code, response.json()
        except Exception as exc:  # noqa: BLE001 - one line's failure is that line's answer, never the batch's
            log.exception("line %d failed", number)
            status, body = 500, APIError(500, f"internal error: {exc!r}", type="server_error").body()
        try:
            if status == 200:
                summary.succeeded += 1
                usage = body.get("usage") or {}
                summary.prompt_tokens += usage.get("prompt_tokens", usage.get("input_tokens", 0))  # the Responses
                summary.completion_tokens += usage.get("completion_tokens", usage.get("output_tokens", 0))  # API's
            else:
                summary.failed += 1
            answered[seq] = _output(line, status, body)
            flush()
        finally:  # after the flush, so a line the window held back sees how far the output got
            await gate.leave(line.prompts)

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rast-batch", timeout=None) as client:
            tasks: set[asyncio.Task[None]] = set()
            last_log, source, number, seq = started, iter(lines), 0, 0
            # each line is read on a worker thread: a pipe that waits for its writer must not stall the
            # requests already read (their answers may be what the writer waits for)
            while (raw := await asyncio.to_thread(next, source, None)) is not None:
                number += 1
                if not raw.strip():
                    continue  # as vLLM's reader: blank lines are no requests
                line = parse_line(raw, number)
                prompts = min(line.prompts, capacity) if line.error is None else 0
                await gate.enter(prompts, lambda: seq - written)
                line.prompts = prompts
                task = asyncio.create_task(answer(seq, number, line, client))
                seq += 1
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                if time.monotonic() - last_log > PROGRESS_SECONDS:
                    last_log = time.monotonic()
                    log.info("run-batch: %d lines answered, %d read", written, seq)
            await asyncio.gather(*tasks)
        summary.engine_error = server.engine.error  # before the lifespan's end stops the engine (and sets it)
    summary.lines, summary.seconds = seq, time.monotonic() - started
    return summary
