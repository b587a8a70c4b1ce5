"""The Responses API's request body, and the chat completion request it stands for.

Every field a client may send is declared: OpenAI's, and the sampling extensions the chat route takes
(top_k, min_p, lam, seed, stop, ...; the same names, types and bounds, copied from ChatCompletionRequest
so the two routes cannot drift). A field whose feature this server does not have is accepted only at its
neutral value (reasoning, truncation, service_tier). The chat request is validated by ChatCompletionRequest
itself, and an error it raises is renamed to the Responses field the client sent (messages -> input,
max_completion_tokens -> max_output_tokens, ...).
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from rast_engine.server.api_error import APIError
from rast_engine.server.chat_messages import ChatMessage
from rast_engine.server.protocol import ChatCompletionRequest
from rast_engine.server.request_json import nulls_to_defaults
from rast_engine.server.responses_api.input_items import input_messages
from rast_engine.server.tools import FunctionSpec, NamedToolChoice, Tool

LOGPROBS = "message.output_text.logprobs"  # the one ``include`` entry this server has
# the chat request's extensions a Responses request may send too (vLLM takes such extras on both routes)
EXTENSIONS = ("top_k", "min_p", "lam", "plausibility_alpha", "priority", "repetition_penalty", "seed", "stop",
              "presence_penalty", "frequency_penalty", "logit_bias", "allowed_token_ids", "bad_words",
              "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output",
              "cache_salt", "structured_outputs", "chat_template_kwargs", "return_tokens_as_token_ids",
              "logits_processors")
# a chat field's error, named as the Responses request spells it
_RENAMED = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text",
            "logprobs": "include"}


class FunctionTool(FunctionSpec):
    """A function tool as the Responses API spells it: flat, with no ``function`` wrapper."""
    type: Literal["function"]

    def as_chat(self) -> Tool:
        return Tool(type="function", function=FunctionSpec(**self.model_dump(exclude={"type"})))


class _Fields(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    input: str | list[dict[str, Any]]
    instructions: Optional[str] = None  # the system message; not carried on by previous_response_id
    previous_response_id: Optional[str] = None
    store: bool = True
    stream: bool = False
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=100.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: Optional[dict[str, Any]] = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    include: Optional[list[str]] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    metadata: Optional[dict[str, str]] = Field(None, max_length=16)
    user: Optional[str] = None
    # OpenAI's routing and abuse-tracing keys: echoed; the prefix cache needs no key to find a shared prefix
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None
    background: bool = False  # background.py
    # accepted at the value that asks for nothing this server lacks
    reasoning: Optional[dict[str, Any]] = None  # {"effort": null, "summary": null}
    truncation: Optional[Literal["disabled", "auto"]] = None
    service_tier: Optional[Literal["auto", "default"]] = None
    stream_options: Optional[dict[str, bool]] = None  # {"include_obfuscation": ...}: nothing is obfuscated here

    @model_validator(mode="before")
    @classmethod
    def _null_takes_default(cls, data: Any) -> Any:
        return nulls_to_defaults(cls, data)

    @model_validator(mode="after")
    def _unsupported(self) -> _Fields:
        refusals = [("background", self.background and (self.stream or not self.store),
                     "a background response is stored and polled: it takes store: true and no stream"),
                    ("truncation", self.truncation == "auto", 'truncation "auto" is not supported; a prompt longer '
                                                              "than the context is a 400 (truncation: \"disabled\")"),
                    ("reasoning", any(v is not None for v in (self.reasoning or {}).values()),
                     "reasoning effort and summaries are not supported (the thinking comes back whole as a "
                     "reasoning item); use chat_template_kwargs, e.g. {\"enable_thinking\": false}"),
                    ("include", any(i != LOGPROBS for i in self.include or ()),
                     f"include may only hold {LOGPROBS!r}")]
        for param, refused, why in refusals:
            if refused:
                raise APIError(400, why, param=param)
        if self.top_logprobs and LOGPROBS not in (self.include or ()):
            raise APIError(400, f"top_logprobs needs include: [{LOGPROBS!r}]", param="top_logprobs")
        return self

    def wants_logprobs(self) -> bool:
        return LOGPROBS in (self.include or ())

    def chat_tools(self) -> Optional[list[Tool]]:
        if self.tools is None:
            return None
        out = []
        for i, tool in enumerate(self.tools):
            if tool.get("type") != "function":
                raise APIError(400, f"tools[{i}]: only function tools are supported, not {tool.get('type')!r}",
                               param="tools")
            try:
                out.append(FunctionTool.model_validate(tool).as_chat())
            except ValidationError as exc:
                err = exc.errors()[0]
                raise APIError(400, f"tools[{i}].{'.'.join(map(str, err['loc']))}: {err['msg']}",
                               param="tools") from None
        return out

    def chat_tool_choice(self) -> str | NamedToolChoice | None:
        choice = self.tool_choice
        if choice is None or isinstance(choice, str):
            return choice
        if choice.get("type") != "function" or set(choice) != {"type", "name"} or not isinstance(choice["name"], str):
            raise APIError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}',
                           param="tool_choice")
        return NamedToolChoice(type="function", function={"name": choice["name"]})

    def response_format(self) -> Optional[dict[str, Any]]:
        fmt = (self.text or {}).get("format")
        if self.text is not None and (set(self.text) - {"format", "verbosity"} or self.text.get("verbosity")):
            raise APIError(400, "text may hold format only (verbosity is not supported)", param="text")
        if fmt is None or (isinstance(fmt, dict) and fmt.get("type") in ("text", "json_object") and len(fmt) == 1):
            return fmt
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
            return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "response"),
                                                           "schema": fmt["schema"]}}
        raise APIError(400, "text.format must be {'type': 'text'}, {'type': 'json_object'} or {'type': "
                            "'json_schema', 'name': ..., 'schema': {...}}", param="text")

    def to_chat(self, history: list[ChatMessage]) -> ChatCompletionRequest:
        """The chat completion this request stands for, after the conversation ``history`` (the messages of
        previous_response_id's chain)."""
        system = [] if self.instructions is None else [ChatMessage(role="system", content=self.instructions)]
        body = {"model": self.model, "messages": system + history + input_messages(self.input),
                "stream": self.stream, "max_completion_tokens": self.max_output_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "tools": self.chat_tools(),
                "tool_choice": self.chat_tool_choice(), "parallel_tool_calls": self.parallel_tool_calls,
                "response_format": self.response_format(), "logprobs": self.wants_logprobs(),
                "top_logprobs": self.top_logprobs if self.wants_logprobs() else None, "user": self.user,
                **{name: getattr(self, name) for name in EXTENSIONS}}
        try:
            return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
        except APIError as exc:
            raise as_responses_error(exc) from None
        except ValidationError as exc:
            err = exc.errors()[0]
            name = str(err["loc"][0]) if err["loc"] else None
            raise APIError(400, f"{_RENAMED.get(name or '', name)}: {err['msg']}",
                           param=_RENAMED.get(name or "", name)) from None


def as_responses_error(exc: APIError) -> APIError:
    """A chat request's error, naming the fields as the Responses request spells them."""
    message = exc.message.replace("response_format", "text.format").replace("max_tokens", "max_output_tokens")
    return APIError(exc.status, message, type=exc.type, param=_RENAMED.get(exc.param or "", exc.param), code=exc.code)


def _extension(name: str) -> tuple[Any, Any]:
    field = ChatCompletionRequest.model_fields[name]
    return field.annotation, field


ResponsesRequest = create_model("ResponsesRequest", __base__=_Fields,
                                **{name: _extension(name) for name in EXTENSIONS})
