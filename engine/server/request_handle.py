"""RequestHandle: one HTTP request's engine requests, seen from the event loop, and the commands it
sends the engine thread (Add, Abort) through AsyncEngine's queue (async_engine.py holds the invariants)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from rast_engine.errors import RastError
from rast_engine.server.protocol import APIError

if TYPE_CHECKING:
    from rast_engine.server.async_engine import AsyncEngine


@dataclass
class Add:
    request_ids: list[str]
    prompts: list[list[int]]  # token ids, encoded on the tokenizer thread
    params: Any  # SamplingParams; its max_tokens is replaced per prompt (request_params.fit_to_context)
    max_tokens: int | None  # None: up to the end of the context
    priority: int  # vLLM's request priority (scheduling_policy "priority")
    done: asyncio.Future
    lora: str | None = None  # the RL model's adapter (EngineConfig.lora_modules), from the request's model name
    cache_salt: str | None = None  # vLLM's: the prompts' prefix-cache salt


@dataclass
class Abort:
    request_ids: list[str]


@dataclass
class Call:
    """Run ``fn`` on the engine thread, between steps (an admin operation such as loading an adapter)."""
    fn: Callable[[], None]
    done: asyncio.Future


def settle(fut: asyncio.Future, exc: BaseException | None) -> None:
    if not fut.done():  # the handler may have been cancelled by a disconnect meanwhile
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)


class RequestHandle:
    """One HTTP request's engine requests. `async with` admits them (RastError -> 400), iteration
    yields their RequestOutputs (of the params' output_kind) until all finish, and leaving aborts
    whatever is unfinished (a client disconnect cancels the handler, which lands here)."""

    def __init__(self, owner: AsyncEngine, request_ids: list[str], prompts: list[str | list[int]],
                 params: Any, max_tokens: int | None, add_special_tokens: bool, param: str, priority: int = 0,
                 lora: str | None = None, cache_salt: str | None = None) -> None:
        self._owner = owner
        self._param = param
        self.request_ids = request_ids
        self._prompts = prompts
        self.params = params  # SamplingParams, max_tokens aside (fit_to_context sets it per prompt)
        self._max_tokens = max_tokens
        self._priority, self._lora, self._cache_salt = priority, lora, cache_salt
        self._add_special_tokens = add_special_tokens
        self._queue: asyncio.Queue = asyncio.Queue()
        self._unfinished = set(request_ids)
        self._started = False
        self._closed = False

    async def __aenter__(self) -> RequestHandle:
        owner = self._owner
        owner.in_flight += len(self.request_ids)
        for rid in self.request_ids:
            owner._queues[rid] = self._queue
        try:
            ids = await owner.in_tokenizer_thread(owner.encode, self._prompts, self._add_special_tokens,
                                                  self.params.truncate_prompt_tokens is None, admitted=True)
            if owner.error is not None:  # died while this one was encoded: no engine thread will read it
                raise APIError(503, f"the engine is not running: {owner.error}", type="server_error",
                               code="engine_dead")
            done = asyncio.get_running_loop().create_future()
            owner._commands.put(Add(self.request_ids, ids, self.params, self._max_tokens, self._priority, done,
                                    self._lora, self._cache_salt))
            await done
        except RastError as exc:
            self._unfinished.clear()
            await self.__aexit__(None, None, None)
            raise APIError(400, str(exc), param=exc.param or self._param) from None
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    @property
    def done(self) -> bool:
        return not self._unfinished

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._closed:
            return
        self._closed = True
        owner = self._owner
        for rid in self.request_ids:
            owner._queues.pop(rid, None)
        if self._unfinished:
            owner._commands.put(Abort(sorted(self._unfinished)))
            self._unfinished.clear()
        owner.in_flight -= len(self.request_ids)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if not self._unfinished:
            raise StopAsyncIteration
        timeout = None if self._started else self._owner.queue_timeout
        try:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            raise APIError(503, f"the request waited more than {timeout:g} s without being "
                                "scheduled; the server is overloaded, retry later",
                           type="server_error", code="queue_timeout") from None
        if isinstance(item, APIError):  # failed alone; leaving the handle aborts its other prompts
            raise item
        if isinstance(item, BaseException):
            raise APIError(500, f"the engine failed: {item!r}", type="server_error",
                           code="engine_error")
        self._started = True
        if item.finished:
            self._unfinished.discard(item.request_id)
        return item
