"""The asyncio face of the synchronous LLMEngine: one background thread runs engine.step() in a
continuous batch while HTTP handlers submit requests and read their outputs from per-request queues.

Invariants:
- only the engine thread touches the engine; handlers talk to it through a command queue, and it
  answers through loop.call_soon_threadsafe;
- prompts are encoded, and chat templates rendered, on one tokenizer thread before a submission
  reaches the engine thread, so a huge prompt delays only the admission of the requests behind it,
  never a step or the event loop (the tokenizer releases the GIL while it encodes); the event loop
  and the engine thread use the tokenizer read-only otherwise (decoding tokens);
- the request-id -> queue table lives on the event loop only, so dispatch needs no lock;
- a submission's prompts (each an engine request) are counted in flight from admission until its
  handle closes; more than max_num_seqs + max_waiting in flight is refused (429), and a submission of
  more prompts than that can never fit (400), so one HTTP request cannot grow an unbounded queue;
- the tokenizer thread's other work (chat templates rendered before admission, /tokenize, /detokenize)
  and the structured outputs' grammar compiles before admission (on worker threads, so a slow schema
  holds up no encode) are bounded alike: more than that many such jobs queued or running is refused
  (429), so a flood of them cannot hold an unbounded backlog in memory; an admitted submission's encode
  is already counted in flight and never refused here;
- a submission the engine cannot admit (a bad prompt, a tokenizer error) fails alone: its prompts
  already added are aborted and its handler gets the error, and the engine thread serves on;
- from a /pause to its /resume (pause_control.py) submissions are held, not admitted, and nothing steps
  except to drain a mode "wait" pause;
- an exception from step() leaves the engine in an unknown state, so the engine is declared dead:
  every open request fails and /health turns 503, rather than serving possibly wrong output. The
  exceptions are NoAdmissibleToken and RequestFailed (a logits processor failed), which name their
  requests after the engine undid the step: those are aborted and fail (api_error.step_failure), and
  the others go on.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar

from rast_engine.errors import NoAdmissibleToken, RastError, RequestFailed
from rast_engine.pausing import PAUSE_MODES
from rast_engine.requests import truncated
from rast_engine.server.prompt_encoding import encode_prompt, prefix_refusal_sound
from rast_engine.server.pause_control import Pause, PauseControl, Resume
from rast_engine.server.api_error import APIError, step_failure
from rast_engine.server.request_handle import Abort, Add, Call, RequestHandle, settle
from rast_engine.server.request_params import fit_to_context

log = logging.getLogger("rast.server")
T = TypeVar("T")


_STOP = object()


class AsyncEngine:
    def __init__(self, engine: Any, *, max_waiting: int = 512, queue_timeout: float | None = None,
                 on_step: Callable[[float], None] | None = None) -> None:
        if max_waiting < 0:
            raise RastError(f"max_waiting must be >= 0, got {max_waiting}")
        if queue_timeout is not None and not 0 < queue_timeout < math.inf:  # NaN too: its timer fires at random
            raise RastError(f"queue_timeout must be a positive number of seconds, got {queue_timeout}")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._prefix_refusal = prefix_refusal_sound(self.tokenizer)  # see prompt_encoding
        self.max_model_len: int = engine.max_model_len
        self.capacity: int = engine.config.max_num_seqs + max_waiting
        self.queue_timeout = queue_timeout
        self.on_step = on_step
        self.stats = engine.stats()  # snapshot, replaced (never mutated) by the engine thread
        self.error: BaseException | None = None
        self.in_flight = 0
        self.unadmitted_jobs = 0  # unadmitted jobs queued or running on the threads (event loop only)
        self._commands: queue.Queue = queue.Queue()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tokenizer_thread: ThreadPoolExecutor | None = None
        self.pausing = PauseControl(self)  # vLLM's /pause and /resume (pause_control.py)

    # ---- lifecycle (event loop) ----
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="rast-tokenizer")
        self._thread = threading.Thread(target=self._run, name="rast-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._commands.put(_STOP)
            self._thread.join()
            self._thread = None
        if self._tokenizer_thread is not None:
            self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)
            self._tokenizer_thread = None

    async def in_tokenizer_thread(self, fn: Callable[..., T], *args: Any, admitted: bool = False) -> T:
        """fn(*args) on the tokenizer thread (see the invariants above); ``admitted``: the encode of a
        submission already counted in flight, which the job bound leaves alone."""
        if self._tokenizer_thread is None:  # stopped (or never started): not asyncio's default pool
            raise APIError(503, "the engine is not running", type="server_error", code="engine_dead")
        run = asyncio.get_running_loop().run_in_executor
        if admitted:
            return await run(self._tokenizer_thread, fn, *args)
        with self._unadmitted_job():
            return await run(self._tokenizer_thread, fn, *args)

    async def in_worker_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on asyncio's default pool, an unadmitted job like the tokenizer thread's (a structured
        output's grammar compile: it may take long, and must not hold up encodes)."""
        with self._unadmitted_job():
            return await asyncio.to_thread(fn, *args)

    @contextlib.contextmanager
    def _unadmitted_job(self) -> Iterator[None]:
        if self.unadmitted_jobs >= self.capacity:
            raise APIError(429, f"server over capacity: {self.unadmitted_jobs} jobs of requests not yet admitted "
                                f"queued or running (limit {self.capacity}); retry later", type="rate_limit_error",
                           code="over_capacity")
        self.unadmitted_jobs += 1
        try:
            yield
        finally:
            self.unadmitted_jobs -= 1

    def encode(self, prompts: list[str | list[int]], add_special_tokens: bool, whole: bool) -> list[list[int]]:
        """Each prompt's token ids (run on the tokenizer thread); RastError for a prompt it cannot encode
        (``whole``: no truncate_prompt_tokens, see prompt_encoding)."""
        refuse = whole and self._prefix_refusal
        return [encode_prompt(self.tokenizer, p, add_special_tokens, self.max_model_len, refuse) for p in prompts]

    # ---- requests (event loop) ----
    async def on_engine_thread(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the engine thread between two steps and wait for it (its exception re-raised)."""
        await self._send(lambda done: Call(fn, done))

    async def pause_generation(self, *, mode: str = "abort", clear_cache: bool = True) -> None:
        """vLLM's EngineClient.pause_generation (pause_control.py): returns once paused, in mode "wait" once
        no request is left."""
        if mode not in PAUSE_MODES:
            raise APIError(400, f"mode must be one of {PAUSE_MODES}, got {mode!r}", param="mode")
        await self._send(lambda done: Pause(mode, clear_cache, done))

    async def resume_generation(self) -> None:
        await self._send(Resume)

    def is_paused(self) -> bool:
        return self.pausing.paused

    async def _send(self, command: Callable[[asyncio.Future], Any]) -> None:
        if self.error is not None or self._thread is None:
            raise APIError(503, f"the engine is not running: {self.error}", type="server_error", code="engine_dead")
        done = asyncio.get_running_loop().create_future()
        self._commands.put(command(done))
        await done

    def submit(self, prompts: list[str | list[int]], params: Any, *, request_id: str,
               max_tokens: int | None, add_special_tokens: bool = True,
               param: str = "prompt", priority: int = 0, lora: str | None = None,
               cache_salt: str | None = None) -> RequestHandle:
        if self.error is not None or self._thread is None:
            raise APIError(503, f"the engine is not running: {self.error}", type="server_error",
                           code="engine_dead")
        if len(prompts) > self.capacity:
            raise APIError(400, f"{len(prompts)} prompts in one request; this server holds at most "
                                f"{self.capacity} in flight", param=param)
        if self.in_flight + len(prompts) > self.capacity:
            raise APIError(429, f"server over capacity: {self.in_flight} prompts in flight, {len(prompts)} "
                                f"more asked for (limit {self.capacity}); retry later", type="rate_limit_error",
                           code="over_capacity")
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        return RequestHandle(self, ids, prompts, params, max_tokens, add_special_tokens, param, priority, lora,
                             cache_salt)

    def _dispatch(self, outputs: list[Any]) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:  # absent: aborted by its handler after this step began
                q.put_nowait(out)

    def _fail_all(self, exc: BaseException) -> None:
        """The engine thread has ended: fail every open request, and every submission it never read
        (runs on the event loop, after `error` is set, so no later submit can slip in)."""
        for q in self._queues.values():
            q.put_nowait(exc)
        dead = APIError(503, f"the engine is not running: {exc}", type="server_error", code="engine_dead")
        self.pausing.fail(dead)
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, (Add, Call, Pause, Resume)):
                settle(cmd.done, dead)

    def _fail_requests(self, exc: NoAdmissibleToken | RequestFailed) -> None:
        for rid in exc.request_ids:
            q = self._queues.get(rid)
            if q is not None:
                q.put_nowait(step_failure(exc, rid))

    # ---- engine thread ----
    def _post(self, fn: Callable, *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # event loop already closed during shutdown
            pass

    def _run(self) -> None:
        try:
            self._serve()
            failure: BaseException = RuntimeError("the server is shutting down")
        except BaseException as exc:  # noqa: BLE001 - reported to every client and to /health
            log.exception("engine loop failed; the server stops accepting requests")
            failure = exc
        self.error = failure
        self._post(self._fail_all, failure)

    def _runnable(self) -> bool:
        """Requests to step, and no pause or sleep in the way (they wait for /resume, /wake_up or loads)."""
        return self.engine.has_unfinished_requests() and self.engine.step_refusal() is None

    def _serve(self) -> None:
        while True:
            self.pausing.settle_drained()
            # Idle (or paused): sleep until a command arrives. Busy: apply whatever is queued and step at
            # once (a step always makes progress; a prefill chunk may just have no output to show yet).
            if not self._drain(block=not self._runnable()):
                return
            if not self._runnable():
                self.stats = self.engine.stats()
                continue
            t0 = time.perf_counter()
            try:
                outputs = self.engine.step()
            except (NoAdmissibleToken, RequestFailed) as exc:  # the step was undone: drop its culprits, serve on
                self.drop_failed(exc)
                continue
            elapsed = time.perf_counter() - t0
            self.stats = self.engine.stats()
            if self.on_step is not None:
                self.on_step(elapsed)
            if outputs:
                self._post(self._dispatch, outputs)

    def drop_failed(self, exc: NoAdmissibleToken | RequestFailed) -> None:
        for rid in exc.request_ids:
            self.engine.abort_request(rid)
        self._post(self._fail_requests, exc)

    def _drain(self, block: bool) -> bool:
        """Apply queued commands (waiting for the first one if ``block``); False once asked to stop."""
        while True:
            try:
                cmd = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if cmd is _STOP:
                return False
            if isinstance(cmd, Abort):
                self.pausing.drop(cmd.request_ids)
                for rid in cmd.request_ids:
                    self.engine.abort_request(rid)
            elif isinstance(cmd, Pause):
                self.pausing.pause(cmd)
            elif isinstance(cmd, Resume):
                self.pausing.resume(cmd)
            elif isinstance(cmd, Call):
                try:
                    cmd.fn()
                except Exception as exc:  # a RastError is the caller's 400; nothing else stops the engine
                    self._post(settle, cmd.done, exc)
                else:
                    self._post(settle, cmd.done, None)
            elif self.pausing.paused:
                self.pausing.hold(cmd)
            else:
                self._add(cmd)

    def _add(self, cmd: Add) -> None:
        added: list[str] = []
        try:
            for rid, ids in zip(cmd.request_ids, cmd.prompts):
                # before the context check (fit_to_context)
                ids = truncated(ids, cmd.params.truncate_prompt_tokens, self.max_model_len)
                prompt = ids if cmd.cache_salt is None else {"prompt_token_ids": ids, "cache_salt": cmd.cache_salt}
                params = fit_to_context(cmd.params, cmd.max_tokens, len(ids), self.max_model_len,
                                        self.engine.sampling_defaults.get("max_tokens"))
                self.engine.add_request(rid, prompt, params, priority=cmd.priority, lora_request=cmd.lora)
                added.append(rid)
        except BaseException as exc:  # RastError: a 400; anything else: a 500 for this submission only
            for rid in added:  # all prompts of a submission are admitted, or none
                self.engine.abort_request(rid)
            self._post(settle, cmd.done, exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._post(settle, cmd.done, None)
