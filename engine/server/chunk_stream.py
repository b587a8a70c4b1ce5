"""The chunk stream of /v1/completions and /v1/chat/completions: OpenAI's server-sent events, the usage
where stream_options asks for it, and an error that comes after the first chunk as an error event."""
from __future__ import annotations

import time
from typing import Any, AsyncIterator

from rast_engine.server.api_error import APIError
from rast_engine.server.http_io import sse
from rast_engine.server.metrics import Metrics
from rast_engine.server.protocol import ChatCompletionRequest, CompletionRequest
from rast_engine.server.request_handle import RequestHandle
from rast_engine.server.responses import Formatter


async def chunk_stream(handle: RequestHandle, fmt: Formatter, first: Any,
                       req: CompletionRequest | ChatCompletionRequest, arrival: float,
                       metrics: Metrics) -> AsyncIterator[str]:
    usage_chunk, usage_each = req.include_usage_chunk(), req.usage_in_every_chunk()
    try:
        if fmt.kind == "chat":
            yield sse(fmt.role_chunk(first))
        out = first
        while True:
            chunks = fmt.chunks(out)
            if usage_each:  # the counts once this output is taken, on each of its chunks
                usage = fmt.usage()
                for chunk in chunks:
                    chunk["usage"] = usage
            if handle.done:
                if usage_chunk:
                    chunks.append(fmt.usage_chunk())
                elif chunks:  # usage rides on the last chunk when no separate one was asked for
                    chunks[-1]["usage"] = fmt.usage()
            for chunk in chunks:
                yield sse(chunk)
            if handle.done:
                break
            out = await handle.__anext__()
        metrics.finished(time.perf_counter() - arrival, fmt.finish_reasons())
    except APIError as exc:
        yield sse(exc.body())
    yield "data: [DONE]\n\n"
