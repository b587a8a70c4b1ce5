"""A chat choice's text as its message and stream deltas carry it: the thinking (a reasoning parser's,
rast_engine.reasoning), the content, and tool calls read from the content (tools.py). One ChatParts is fed
a choice's text in order, whole for a message or in deltas for a stream; both give the same parts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from rast_engine.reasoning import Parser, ReasoningSplitter, Start, prompt_start
from rast_engine.server.tools import ToolMode, ToolStream


@dataclass(frozen=True)
class Reasoning:
    """How a chat response splits its choices' text (rast_engine.reasoning)."""
    start: Start  # where the rendered prompt leaves the output (prompt_start)
    include: bool = True  # vLLM's include_reasoning: False drops the reasoning from the response

    @classmethod
    def of(cls, parser: Parser, prompt: str, include: bool) -> Reasoning:
        return cls(prompt_start(parser, prompt), include)

    def fields(self, reasoning: str) -> dict[str, Any]:
        """The reasoning's message or delta fields: vLLM's name and its older one, which clients still read."""
        if not self.include:
            return {}
        value = reasoning or None
        return {"reasoning": value, "reasoning_content": value}


class ChatParts:
    """One choice's parsers over its text."""

    def __init__(self, reasoning: Optional[Reasoning], tools: Optional[ToolMode]) -> None:
        self.reasoning, self.tools = reasoning, tools
        self.splitter = None if reasoning is None else ReasoningSplitter(reasoning.start)
        self.calls = None if tools is None else ToolStream(tools)
        # calls the model chose were made: a choice that stopped finishes with "tool_calls" (a named
        # function's forced call keeps "stop", as OpenAI's and vLLM's)
        self.called = False

    def finish_reason(self, reason: Optional[str]) -> Optional[str]:
        chose = self.tools is not None and self.tools.kind != "named"
        return "tool_calls" if self.called and chose and reason == "stop" else reason

    def _parts(self, text: str, final: bool) -> tuple[str, str, list[dict[str, Any]]]:
        reasoning, content = ("", text) if self.splitter is None else self.splitter.feed(text, final)
        calls: list[dict[str, Any]] = []
        if self.calls is not None:
            content, calls = self.calls.feed(content, final)
        self.called = self.called or bool(calls)
        return reasoning, content, calls

    def message(self, text: str) -> dict[str, Any]:
        """A whole choice's message; as vLLM's, content is null where there is none beside thinking or calls."""
        reasoning, content, calls = self._parts(text, final=True)
        message = {"role": "assistant", "content": content if content or not (reasoning or calls) else None}
        if self.reasoning is not None:
            message.update(self.reasoning.fields(reasoning))
        if calls:
            message["tool_calls"] = calls
        return message

    def delta(self, text: str, final: bool) -> dict[str, Any]:
        """A stream chunk's delta for the choice's new text; empty while the parsers hold it back."""
        reasoning, content, calls = self._parts(text, final)
        delta: dict[str, Any] = {}
        if reasoning and self.reasoning is not None:
            delta.update(self.reasoning.fields(reasoning))
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [{"index": j, **call} for j, call in enumerate(calls)]
        return delta
