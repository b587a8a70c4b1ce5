"""The server's side of vLLM's /pause, /resume and /is_paused (engine/pausing.py has the modes), run on the
engine thread.

Invariants:
- from a /pause until its /resume, new submissions are held here, never added to the engine, and their
  handlers wait (as vLLM's add_request does); a held submission whose client leaves is dropped, and
  every held one is added, in arrival order, on /resume;
- mode "wait": the server keeps stepping, and streaming, the requests in flight, and the /pause answers
  once none is left; a /resume before that answers that /pause 409, and "abort" or "keep" meanwhile
  ends the wait at once;
- a request that a pause ends ("abort") or lands ("keep") gets its outputs as after any step.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rast_engine.errors import NoAdmissibleToken, RequestFailed
from rast_engine.server.protocol import APIError
from rast_engine.server.request_handle import Add, settle

if TYPE_CHECKING:
    from rast_engine.server.async_engine import AsyncEngine


@dataclass
class Pause:
    mode: str  # engine/pausing.py's PAUSE_MODES
    clear_cache: bool
    done: asyncio.Future


@dataclass
class Resume:
    done: asyncio.Future


class PauseControl:
    def __init__(self, owner: AsyncEngine) -> None:
        self._owner = owner
        self.paused = False  # new submissions are held; written on the engine thread, read by /is_paused
        self.held: list[Add] = []
        self._draining: list[Pause] = []  # "wait" pauses, answered once no request is left

    def hold(self, cmd: Add) -> None:
        self.held.append(cmd)

    def drop(self, request_ids: list[str]) -> None:
        """A held submission whose handler left (it aborts all of its ids)."""
        gone = set(request_ids)
        self.held = [cmd for cmd in self.held if gone.isdisjoint(cmd.request_ids)]

    def pause(self, cmd: Pause) -> None:
        self.paused = True
        engine = self._owner.engine
        if cmd.mode == "wait" and engine.has_unfinished_requests() and not engine.is_paused():
            self._draining.append(cmd)
            return
        self._pause_engine(cmd.mode, cmd.clear_cache)
        self._owner._post(settle, cmd.done, None)
        self.settle_drained()

    def settle_drained(self) -> None:
        """Answer the "wait" pauses once the engine has no request left (or another mode paused it)."""
        engine = self._owner.engine
        if self._draining and (engine.is_paused() or not engine.has_unfinished_requests()):
            for cmd in self._draining:
                self._pause_engine("wait", cmd.clear_cache)
                self._owner._post(settle, cmd.done, None)
            self._draining = []

    def resume(self, cmd: Resume) -> None:
        for pause in self._draining:
            self._owner._post(settle, pause.done, APIError(409, "resumed before the requests in flight finished",
                                                           code="resumed"))
        self._draining = []
        self._owner.engine.resume_generation()
        self.paused = False
        held, self.held = self.held, []
        for add in held:
            self._owner._add(add)
        self._owner._post(settle, cmd.done, None)

    def fail(self, exc: APIError) -> None:
        """The engine thread has ended (event loop): no held submission or waiting pause is answered."""
        for cmd in [*self.held, *self._draining]:
            settle(cmd.done, exc)
        self.held, self._draining = [], []

    def _pause_engine(self, mode: str, clear_cache: bool) -> None:
        owner = self._owner
        try:
            outputs = owner.engine.pause_generation(mode=mode, clear_cache=clear_cache)
        except (NoAdmissibleToken, RequestFailed) as exc:  # the landing batch was undone: drop its culprits
            owner.drop_failed(exc)
            outputs = owner.engine.pause_generation(mode=mode, clear_cache=clear_cache)
        if outputs:
            owner._post(owner._dispatch, outputs)
