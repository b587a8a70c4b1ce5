"""A response's output items and stream events, built from its chat choice's stream deltas.

The chat Formatter (kind "chat", one choice) folds the engine's delta outputs and splits their text into
thinking, content and tool calls; every delta it gives becomes events here, and the items are what the
events wrote. A response that is not streamed is built by the same path with its events dropped, so a
stream's events always rebuild the non-streamed body.

Invariants: items are written in the order the parts come (reasoning, then the message, then the calls:
the splitters hold the content back until the thinking ends, and calls come whole at the end); at most
one item is open, and it is closed (``*.done`` events) before another opens; every item is closed when the
choice finishes, with status ``incomplete`` where max_output_tokens cut it.

``output_tokens_details.reasoning_tokens`` counts the tokens of the engine outputs that were read while
the thinking was open, up to and including the one that closed it.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from rast_engine.server.responses import Formatter


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class _Open:
    """The item being written: a reasoning item's or a message's one text part."""
    kind: str  # "reasoning" or "message"
    index: int  # its output_index
    item_id: str
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)


class ResponseOutput:
    def __init__(self, chat: Formatter, head: dict[str, Any]) -> None:
        self.chat = chat  # one choice: index 0
        self.head = head  # the response's fields that do not change while it runs
        self.items: list[dict[str, Any]] = []
        self.open: Optional[_Open] = None
        self.reasoning_tokens = 0
        self.undecided = 0  # tokens read while the splitter could not yet tell thinking from answer
        self.sequence = 0  # the stream's sequence_number of the next event

    # ---- folding engine outputs ----
    def _state(self) -> str:
        ch = self.chat.choices.get(0)
        splitter = None if ch is None or ch.parts is None else ch.parts.splitter
        return "start" if splitter is None else splitter.state

    def add(self, out: Any) -> list[dict[str, Any]]:
        """Fold a delta output in; the events it brings."""
        tokens = sum(len(c.token_ids) for c in out.outputs)
        before = self._state()
        chunks = self.chat.chunks(out)
        events: list[dict[str, Any]] = []
        thought = False
        for chunk in chunks:
            (choice,) = chunk["choices"]
            delta = choice["delta"]
            thought = thought or bool(delta.get("reasoning"))
            events += self._write("reasoning", delta.get("reasoning"))
            events += self._write("message", delta.get("content"), (choice["logprobs"] or {}).get("content"))
            for call in delta.get("tool_calls") or ():
                events += self._call(call)
            if choice["finish_reason"] is not None:
                events += self._close()
        if self.chat.reasoning is not None:
            after = self._state()
            if thought or "reasoning" in (before, after):
                self.reasoning_tokens += self.undecided + tokens
                self.undecided = 0
            elif after == "start":
                self.undecided += tokens
            else:
                self.undecided = 0
        return events

    def _write(self, kind: str, text: Optional[str], logprobs: Optional[list[dict[str, Any]]] = None
               ) -> list[dict[str, Any]]:
        if not text and not logprobs:
            return []
        events: list[dict[str, Any]] = []
        if self.open is None or self.open.kind != kind:
            events += self._close()
            self.open = _Open(kind, len(self.items), _id("rs" if kind == "reasoning" else "msg"))
            self.items.append(self._item(self.open, "in_progress"))
            events += [{"type": "response.output_item.added", "output_index": self.open.index,
                        "item": self._item(self.open, "in_progress", empty=True)},
                       {**self._where(), "type": "response.content_part.added", "part": self._part(empty=True)}]
        self.open.text.append(text or "")
        self.open.logprobs += logprobs or []
        if kind == "reasoning":
            return events + [{**self._where(), "type": "response.reasoning_text.delta", "delta": text}]
        return events + [{**self._where(), "type": "response.output_text.delta", "delta": text or "",
                          "logprobs": logprobs or []}]

    def _call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        index, fn = len(self.items), call["function"]
        item = {"id": _id("fc"), "type": "function_call", "call_id": call["id"], "name": fn["name"],
                "arguments": fn["arguments"], "status": self._finished_status()}
        self.items.append(item)
        where = {"item_id": item["id"], "output_index": index}
        return events + [{"type": "response.output_item.added", "output_index": index,
                          "item": {**item, "arguments": "", "status": "in_progress"}},
                         {**where, "type": "response.function_call_arguments.delta", "delta": fn["arguments"]},
                         {**where, "type": "response.function_call_arguments.done", "name": fn["name"],
                          "arguments": fn["arguments"]},
                         {"type": "response.output_item.done", "output_index": index, "item": dict(item)}]

    def _close(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        opened, self.open = self.open, None
        status = self._finished_status()
        self.items[opened.index] = item = self._item(opened, status)
        part = item["content"][0]
        where = {"item_id": opened.item_id, "output_index": opened.index, "content_index": 0}
        done = ({**where, "type": "response.reasoning_text.done", "text": part["text"]} if opened.kind == "reasoning"
                else {**where, "type": "response.output_text.done", "text": part["text"], "logprobs": part["logprobs"]})
        return [done, {**where, "type": "response.content_part.done", "part": part},
                {"type": "response.output_item.done", "output_index": opened.index, "item": item}]

    # ---- items and the response ----
    def _where(self) -> dict[str, Any]:
        return {"item_id": self.open.item_id, "output_index": self.open.index, "content_index": 0}

    def _part(self, opened: Optional[_Open] = None, empty: bool = False) -> dict[str, Any]:
        opened = opened or self.open
        text = "" if empty else "".join(opened.text)
        if opened.kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        logprobs = [] if empty else list(opened.logprobs)
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}

    def _item(self, opened: _Open, status: str, empty: bool = False) -> dict[str, Any]:
        content = [] if empty else [self._part(opened)]
        if opened.kind == "reasoning":
            return {"id": opened.item_id, "type": "reasoning", "summary": [], "content": content, "status": status}
        return {"id": opened.item_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def _finish_reason(self) -> Optional[str]:
        ch = self.chat.choices.get(0)
        return None if ch is None else ch.finish_reason

    def _finished_status(self) -> str:
        return "incomplete" if self._finish_reason() in ("length", "abort") else "completed"

    def status(self) -> str:
        return {None: "in_progress", "length": "incomplete", "abort": "cancelled"}.get(self._finish_reason(),
                                                                                       "completed")

    def body(self) -> dict[str, Any]:
        status = self.status()
        usage = self.chat.usage()
        incomplete = {"reason": "max_output_tokens"} if self._finish_reason() == "length" else None
        return {**self.head, "status": status, "incomplete_details": incomplete,
                "output": [dict(item) for item in self.items] if status != "in_progress" else [],
                "usage": None if status == "in_progress" else {
                    "input_tokens": usage["prompt_tokens"],
                    "input_tokens_details": {"cached_tokens": sum(self.chat.cached_tokens.values())},
                    "output_tokens": usage["completion_tokens"],
                    "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                    "total_tokens": usage["total_tokens"]}}

    def finish_reasons(self) -> list[Optional[str]]:
        return self.chat.finish_reasons()

    # ---- the stream ----
    def sse(self, events: list[dict[str, Any]]) -> str:
        """Server-sent events as OpenAI sends them: each named by its type, numbered in stream order."""
        text = []
        for event in events:
            event = {"type": event["type"], "sequence_number": self.sequence, **event}
            self.sequence += 1
            text.append(f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n")
        return "".join(text)

    def opening(self) -> list[dict[str, Any]]:
        response = self.body()
        return [{"type": "response.created", "response": response},
                {"type": "response.in_progress", "response": response}]

    def closing(self) -> list[dict[str, Any]]:
        """The last event: response.completed, or response.incomplete for a response cut short (by
        max_output_tokens, or cancelled by the server: there is no cancelled event, its status says it)."""
        body = self.body()
        kind = "response.completed" if body["status"] == "completed" else "response.incomplete"
        return self._close() + [{"type": kind, "response": body}]
