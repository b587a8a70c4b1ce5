"""A Responses request's ``input`` as chat messages.

The input is a string (one user message) or a list of items: messages (``role`` and ``content``, a string
or ``input_text`` / ``output_text`` parts), ``function_call`` items (an assistant's calls) and their
``function_call_output`` items (tool messages), and ``reasoning`` items. A response's output items are
valid input items, so a conversation is replayed by sending them back, and previous_response_id replays
the stored ones through this same reading.

Replay rules, those of the chat templates that read such messages: a reasoning item's text becomes the
``reasoning_content`` of the assistant message after it; function calls join the assistant message they
follow (a message's text, then its calls, as one turn). Images, files, audio and refusals are refused
with a 400, never dropped.
"""
from __future__ import annotations

from typing import Any, Optional

from rast_engine.server.api_error import APIError
from rast_engine.server.chat_messages import ChatMessage
from rast_engine.server.tools import FunctionCall, ToolCall

_KEYS = {"message": {"type", "role", "content", "id", "status"},
         "function_call": {"type", "call_id", "name", "arguments", "id", "status"},
         "function_call_output": {"type", "call_id", "output", "id", "status"},
         "reasoning": {"type", "id", "summary", "content", "encrypted_content", "status"}}
_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text")


def _fail(where: str, why: str) -> APIError:
    return APIError(400, f"{where}: {why}", param="input")


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise _fail(where, f"{key} must be a string")
    return value


def _text(content: Any, where: str) -> str | list[dict[str, str]]:
    """A message's content as chat content: the string, or its text parts (joined as chat joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _fail(where, "content must be a string or a list of input_text / output_text parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise _fail(f"{where}.content[{j}]", f"only text parts ({', '.join(_TEXT_PARTS)}) are supported, "
                                                 f"not {kind!r}")
        if part.get("annotations"):
            raise _fail(f"{where}.content[{j}]", "annotations are not supported (only empty)")
        parts.append({"type": "text", "text": part["text"]})
    return parts


def _reasoning_text(item: dict[str, Any], where: str) -> str:
    if item.get("encrypted_content") is not None:
        raise _fail(where, "encrypted reasoning is not supported; send the reasoning item this server returned")
    parts = item.get("content") or []
    if not isinstance(parts, list) or not all(isinstance(p, dict) and p.get("type") == "reasoning_text"
                                               and isinstance(p.get("text"), str) for p in parts):
        raise _fail(where, "a reasoning item's content must be a list of reasoning_text parts")
    return "\n".join(p["text"] for p in parts)


def input_messages(items: str | list[dict[str, Any]]) -> list[ChatMessage]:
    """The chat messages of ``input`` (APIError(400), param input, naming the item at fault)."""
    if isinstance(items, str):
        return [ChatMessage(role="user", content=items)]
    messages: list[ChatMessage] = []
    thinking: Optional[str] = None  # a reasoning item's text, waiting for its assistant message
    try:
        for i, item in enumerate(items):
            where = f"input[{i}]"
            kind = item.get("type", "message")
            if not isinstance(kind, str) or kind not in _KEYS:
                raise _fail(where, f"items of type {kind!r} are not supported (only {', '.join(_KEYS)})")
            extra = set(item) - _KEYS[kind]
            if extra:
                raise _fail(where, f"unrecognised field(s) {sorted(extra)} in a {kind} item")
            if kind == "reasoning":
                text = _reasoning_text(item, where)
                thinking = text if thinking is None else f"{thinking}\n{text}"
            elif kind == "function_call":
                call = ToolCall(id=_string(item, "call_id", where), function=FunctionCall(
                    name=_string(item, "name", where), arguments=_string(item, "arguments", where)))
                last = messages[-1] if messages else None
                if thinking is None and last is not None and last.role == "assistant":
                    last.tool_calls = [*(last.tool_calls or []), call]  # the same turn: its text, then its calls
                else:
                    messages.append(ChatMessage(role="assistant", tool_calls=[call], reasoning=thinking))
                    thinking = None
            elif kind == "function_call_output":
                if thinking is not None:
                    messages.append(ChatMessage(role="assistant", reasoning=thinking))
                    thinking = None
                messages.append(ChatMessage(role="tool", tool_call_id=_string(item, "call_id", where),
                                            content=_text(item.get("output"), where)))
            else:
                role = item.get("role")
                if not isinstance(role, str) or role not in _ROLES:
                    raise _fail(where, f"role must be one of {', '.join(_ROLES)}, not {role!r}")
                if role == "assistant":
                    messages.append(ChatMessage(role=role, content=_text(item.get("content"), where),
                                                reasoning=thinking))
                else:
                    if thinking is not None:
                        messages.append(ChatMessage(role="assistant", reasoning=thinking))
                    messages.append(ChatMessage(role=role, content=_text(item.get("content"), where)))
                thinking = None
        if thinking is not None:
            messages.append(ChatMessage(role="assistant", reasoning=thinking))
    except APIError as exc:  # ChatMessage's own checks name the chat field
        exc.param = "input"
        raise
    if not messages:
        raise APIError(400, "input holds no message", param="input")
    return messages
