"""Tool calls in chat: OpenAI's ``tools`` and ``tool_choice``, as vLLM serves them.

- ``"none"``: the tools reach the chat template (``tools=``), and the output is text.
- a named function (``{"type": "function", "function": {"name": ...}}``): the output is held to that
  function's parameters schema (a structured output) and returned as its one call.
- ``"required"``: held to a JSON array of at least one ``{"name", "parameters"}`` object over the tools (at
  most one with ``parallel_tool_calls: false``), each returned as a call.
- ``"auto"`` (``rast serve --enable-auto-tool-choice --tool-call-parser hermes``; the default when tools
  are given, as vLLM's): the model decides. Its ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks (the Hermes format of Qwen2.5's and Qwen3's templates) become calls and the text before the first
  block the content; a block that is not such JSON leaves the whole text as content, as vLLM's parser does.

Calls are read from the content, after a reasoning parser took the thinking out. A choice that made calls
finishes with ``tool_calls`` (OpenAI's reason) unless it was cut by length. Streams send content as it
comes until a call may start (``<tool_call>``, held while the text ends in a prefix of it; everything of a
constrained choice), and the calls whole in the choice's finishing chunk: the deltas join to the
non-streamed message.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from rast_engine.reasoning import tag_prefix_len
from rast_engine.server.api_error import APIError

PARSERS = ("hermes",)
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_\-.]{1,64}$")  # OpenAI's rule for a function's name
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema; none: any object
    strict: Optional[bool] = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


class _Name(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: _Name


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    parsed_arguments: Any = None  # the openai client's stream helper adds it; arguments say the same


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall
    index: Optional[int] = None  # a streamed call's position, which the openai client's helper keeps

    def for_template(self) -> dict[str, Any]:
        """As chat templates read a call: its arguments as an object (vLLM hands them over the same way)."""
        try:
            arguments = json.loads(self.function.arguments)
        except (ValueError, RecursionError):
            raise APIError(400, f"messages: tool call {self.function.name!r} has arguments that are not JSON",
                           param="messages") from None
        return {**({} if self.id is None else {"id": self.id}), "type": "function",
                "function": {"name": self.function.name, "arguments": arguments}}


@dataclass(frozen=True)
class ToolMode:
    """How a chat response reads calls from its choices' content."""
    kind: Literal["auto", "named", "required"]
    name: Optional[str] = None  # the named function
    single: bool = False  # parallel_tool_calls false: at most one call


def required_schema(tools: list[Tool], single: bool) -> dict[str, Any]:
    """The JSON schema of "required": an array of {"name", "parameters"} calls over the tools. Each tool's
    $defs move to the root, where its "#/$defs/..." references (pydantic's, for nested models) still
    resolve; two tools defining one name differently are a 400, as in vLLM."""
    defs: dict[str, dict[str, Any]] = {"$defs": {}, "definitions": {}}  # the older draft's name too
    calls = []
    for t in tools:
        params = dict(t.function.parameters or {"type": "object"})
        for key, found in defs.items():
            for name, schema in (params.pop(key, None) or {}).items():
                if found.setdefault(name, schema) != schema:
                    raise APIError(400, f"tools define {key} {name!r} differently; rename one", param="tools")
        calls.append({"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                                       "parameters": params},
                      "required": ["name", "parameters"], "additionalProperties": False})
    return {"type": "array", "minItems": 1, **({"maxItems": 1} if single else {}), "items": {"anyOf": calls},
            **{key: found for key, found in defs.items() if found}}


def _dumps(value: Any) -> str:
    """JSON text of a call's arguments: characters as they are, escaped where JSON's text held a lone
    surrogate (no UTF-8 body could carry it)."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value)
    return text


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _hermes(text: str) -> Optional[list[dict[str, Any]]]:
    """The calls of ``text``'s <tool_call> blocks (an unclosed last one too), or None unless every block
    is {"name": str, "arguments": object}."""
    calls = []
    for block in _BLOCK.findall(text):
        try:
            value = json.loads(block)
        except (ValueError, RecursionError):
            return None
        if not (isinstance(value, dict) and isinstance(value.get("name"), str)
                and isinstance(value.get("arguments", {}), dict)):
            return None
        calls.append(_call(value["name"], _dumps(value.get("arguments", {}))))
    return calls


def extract_calls(mode: ToolMode, content: str) -> tuple[Optional[str], list[dict[str, Any]]]:
    """A whole choice's (content, calls)."""
    if mode.kind == "named":  # no answer (an EOS inside the thinking, where nothing is masked): no call
        return (None, [_call(mode.name or "", content)]) if content.strip() else (content, [])
    if mode.kind == "required":
        try:
            value = json.loads(content)
        except (ValueError, RecursionError):  # cut by max_tokens: no call to make of it
            return content, []
        if not (isinstance(value, list) and all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                                and "parameters" in c for c in value)):
            return content, []
        return None, [_call(c["name"], _dumps(c["parameters"])) for c in value]
    start = content.find(OPEN)
    calls = None if start < 0 else _hermes(content[start:])
    if not calls:
        return content, []
    return content[:start] or None, calls[:1] if mode.single else calls


@dataclass
class ToolStream:
    """One choice's content in stream deltas: what may be sent now, and the calls at the end."""
    mode: ToolMode
    text: str = ""  # all content so far
    sent: int = 0  # how much of it was sent as content
    holding: bool = field(init=False)

    def __post_init__(self) -> None:
        self.holding = self.mode.kind != "auto"  # a constrained choice is all call

    def feed(self, content: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        self.text += content
        if final:
            whole, calls = extract_calls(self.mode, self.text)
            rest = (whole or "")[self.sent:] if calls else self.text[self.sent:]
            return rest, calls
        if not self.holding:
            start = self.text.find(OPEN, self.sent)
            self.holding = start >= 0
            upto = start if start >= 0 else len(self.text) - tag_prefix_len(self.text, OPEN)
            out, self.sent = self.text[self.sent:upto], max(upto, self.sent)
            return out, []
        return "", []
