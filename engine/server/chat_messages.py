"""Chat messages as clients send them, and their rendering through the chat template."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator
from rast_engine.errors import RastError
from rast_engine.requests import chat_template_variables, render_conversation
from rast_engine.server.api_error import APIError
from rast_engine.server.tools import Tool, ToolCall


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # null only for an assistant's (a reasoning parser's reply that was all thinking, replayed)
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls (engine/server/tools.py)
    tool_call_id: str | None = None  # a tool message's: the call it answers
    # an assistant message as OpenAI's client returns it (message.model_dump()) carries these, null or
    # empty when the message is text; anything else is a feature this server does not have
    refusal: str | None = None
    parsed: Any = None  # the openai client's parse helpers add it; content says the same
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    annotations: list[dict[str, Any]] | None = None
    # an assistant message's thinking, as a reasoning parser returned it (vLLM's name and its older one):
    # it reaches the chat template as reasoning_content, which Qwen3's template reads
    reasoning: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ChatMessage:
        for name in ("refusal", "function_call", "audio", "annotations"):
            if getattr(self, name):
                raise APIError(400, f"messages: a message's {name} is not supported by this server (only null "
                                    "or empty); give its text as content", param="messages")
        if self.tool_calls and self.role != "assistant":
            raise APIError(400, f"messages: a {self.role} message makes no tool calls; only an assistant's does",
                           param="messages")
        if (self.tool_call_id is None) != (self.role != "tool"):
            raise APIError(400, "messages: a tool message needs the tool_call_id it answers, and only it has one",
                           param="messages")
        if self.content is None and self.role != "assistant":
            raise APIError(400, f"messages: a {self.role} message needs content (only an assistant's may be null)",
                           param="messages")
        if self.thinking() is not None and self.role != "assistant":
            raise APIError(400, f"messages: a {self.role} message has no reasoning; only an assistant's does",
                           param="messages")
        if self.reasoning is not None and self.reasoning_content not in (None, self.reasoning):
            raise APIError(400, "messages: a message's reasoning and reasoning_content differ; give one",
                           param="messages")
        return self

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it ("developer" is OpenAI's new name for "system", which
        templates know)."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.thinking() is not None:
            message["reasoning_content"] = self.thinking()
        if self.tool_calls:
            message["tool_calls"] = [call.for_template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message

    def thinking(self) -> str | None:
        return self.reasoning if self.reasoning is not None else self.reasoning_content

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)  # as vLLM joins a message's text parts


def render_chat(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool,
                variables: dict[str, Any] | None = None, continue_final_message: bool = False,
                tools: list[Tool] | None = None) -> str:
    """The chat template's text of ``messages`` (``variables``: chat_template_kwargs; continue_final_message:
    the last message left open for the output to continue, as vLLM's and HF's; ``tools``: the functions the
    template lists); APIError(400) naming them when the template refuses them."""
    if add_generation_prompt and continue_final_message:  # vLLM's rule: the two would open two messages
        raise APIError(400, "continue_final_message continues the last message and excludes add_generation_prompt "
                            "(send add_generation_prompt: false)", param="continue_final_message")
    conversation = [m.for_template() for m in messages]
    try:
        extra = chat_template_variables(tokenizer, variables)
        return render_conversation(tokenizer, conversation, "the messages", extra,
                                   add_generation_prompt=add_generation_prompt,
                                   continue_final_message=continue_final_message,
                                   tools=None if not tools else [t.model_dump(exclude_none=True) for t in tools])
    except RastError as exc:  # a client error: a variable the template may not take, or a template refusing them
        raise APIError(400, str(exc), param=exc.param) from None
