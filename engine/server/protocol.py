"""OpenAI request models and the error body. Every field a client may send is declared; unknown fields
and unsupported features are rejected with a 400 naming the field, so a typo ("lamda") never silently
falls back to a default."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from rast_engine.server.api_error import APIError
from rast_engine.server.chat_messages import ChatMessage
from rast_engine.server.processor_names import ProcessorConstructor
from rast_engine.server.request_json import nulls_to_defaults
from rast_engine.server.tools import NamedToolChoice, Tool, ToolMode, required_schema


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


# A request's logit_bias entries are sent to the device at each of its steps (engine/logit_adjust.py), so
# their number bounds the host work one request adds to every batch it joins
MAX_LOGIT_BIAS_ENTRIES = 1024


class _Request(BaseModel):
    # extra="forbid": an unrecognised field is a client mistake, answered with a 400 naming it (the model
    # validators raise APIError naming theirs: pydantic gives their errors no location); NaN and
    # infinities are no number any field takes.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's spelling) -> [-100, 100]
    user: str | None = None
    # Extensions (vLLM spells them the same way): top-k/min-p filters, the per-request RAST weight,
    # the repetition penalty, token masks, min_tokens and how the text is cut and rendered.
    # temperature, top_p, top_k, min_p and repetition_penalty: None takes the generation config's value
    # (rast serve --generation-config), else the neutral one
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    lam: float | list[float] | None = None  # one number, or one per small pair
    plausibility_alpha: float = Field(0.0, ge=0.0, le=1.0)  # contrastive decoding's mask (rast's own field)
    priority: StrictInt = Field(0, ge=-2**63, le=2**63 - 1)  # vLLM's: lower first, with --scheduling-policy priority
    repetition_penalty: float | None = Field(None, ge=0.01, le=100.0)
    allowed_token_ids: list[StrictInt] | None = Field(None, min_length=1)
    # structured outputs: OpenAI's response_format, or vLLM's structured_outputs (one of json, json_object,
    # regex, choice, grammar); at most one of the two
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    # vLLM's older spellings of structured_outputs' json, regex, choice and grammar
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    bad_words: list[str] | None = None
    min_tokens: int = Field(0, ge=0)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # the prompt's last k tokens (-1: the context's room)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    ignore_eos: bool = False
    stop_token_ids: list[StrictInt] | None = None
    # vLLM's: each prompt token's logprob under the combined distribution, its rank, and the top k there
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    # vLLM's: logprobs name tokens "token_id:<id>" (RL frameworks read the ids back; a token's text may
    # not be valid UTF-8 on its own)
    return_tokens_as_token_ids: bool = False
    # vLLM's: the prompt's token ids and each choice's generated ids beside the text (RL frameworks train on
    # exactly the ids that were sampled, never a re-tokenisation of the text)
    return_token_ids: bool = False
    # vLLM's: the prompt shares prefix-cache blocks only with requests of the same salt (multi-tenant
    # servers: no probing of another tenant's prompts through the cache's timing)
    cache_salt: str | None = Field(None, min_length=1)
    # vLLM V0's: processors by qualified name, or factories {qualname, args, kwargs}, that rast serve
    # --logits-processor-pattern allows (server/processor_names.py)
    logits_processors: list[str | ProcessorConstructor] | None = Field(None, min_length=1)
    # vLLM's beam search: the n best beams under the combined distribution (engine/beam_search.py)
    use_beam_search: bool = False
    length_penalty: float = 1.0

    @model_validator(mode="before")
    @classmethod
    def _null_takes_default(cls, data: Any) -> Any:
        return nulls_to_defaults(cls, data)

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keep(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be >= 1, or -1 (as many as the context leaves room for)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None and len(value) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(value)}")
        ids: set[int] = set()
        for key, bias in (value or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError(f"keys must be token ids (non-negative integers, at most 10 digits), "
                                 f"got {key[:20]!r}")
            if int(key) in ids:
                raise ValueError(f"token {int(key)} is named twice")
            ids.add(int(key))
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases must be in [-100, 100], got {bias!r} for token {key}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> _Request:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        return self

    def structured(self) -> dict[str, Any] | None:
        """The StructuredOutputsParams fields the request asks for, or None; APIError(400) for a
        response_format other than text, json_object or json_schema with a schema."""
        fmt = self.response_format
        guided = {kind: value for kind in ("json", "regex", "choice", "grammar")
                  if (value := getattr(self, f"guided_{kind}")) is not None}
        fmt = None if fmt is not None and fmt.get("type") == "text" else fmt  # text: no constraint
        given = [name for name, value in (("response_format", fmt), ("structured_outputs", self.structured_outputs),
                                          ("guided_*", guided or None)) if value is not None]
        if len(given) > 1:
            raise APIError(400, f"give one of response_format, structured_outputs and guided_*, not {given}",
                           param=given[0])
        if guided:
            return guided
        if fmt is None or fmt.get("type") == "text":
            return self.structured_outputs
        if fmt.get("type") == "json_object":
            return {"json_object": True}
        spec = fmt.get("json_schema")
        if fmt.get("type") == "json_schema" and isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
            return {"json": spec["schema"]}
        raise APIError(400, "response_format must be {'type': 'text'}, {'type': 'json_object'} or {'type': "
                       "'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}", param="response_format")

    def prompt_logprobs_count(self) -> int | None:
        """prompt_logprobs, as vLLM takes it: not with a stream (APIError(400))."""
        if self.prompt_logprobs is not None and self.stream:
            raise APIError(400, "prompt_logprobs is not available with stream: true", param="prompt_logprobs")
        return self.prompt_logprobs

    def logit_bias_ids(self) -> dict[int, float] | None:
        return {int(key): bias for key, bias in self.logit_bias.items()} if self.logit_bias else None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage_chunk(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def usage_in_every_chunk(self) -> bool:
        return self.include_usage_chunk() and self.stream_options.continuous_usage_stats


class CompletionRequest(_Request):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]  # strict: true is no token id
    # 0 only with echo: the prompt scored, nothing generated (OpenAI's legacy API, vLLM)
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_checks(self) -> CompletionRequest:
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens must be >= 1; 0 only with echo: true, which returns the prompt "
                                "(with logprobs: scored) and generates nothing", param="max_tokens")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of must equal n (or be omitted)", param="best_of")
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return self

    def max_new_tokens(self) -> int | None:
        """The tokens the engine generates: echo with max_tokens 0 draws one, which the response drops."""
        return 1 if self.max_tokens == 0 else self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: a string, a list of token ids, or a list of either."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # vLLM's: the output continues the last (assistant) message
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: more template variables (enable_thinking)
    include_reasoning: bool = True  # vLLM's: False drops a reasoning parser's thinking from the response
    # tools (engine/server/tools.py): tool_choice "none", "auto" (the default with tools, as vLLM's),
    # "required" or a named function
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _chat_checks(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        if self.tool_choice is None:
            self.tool_choice = "auto" if self.tools else "none"
        if self.tool_choice != "none" and not self.tools:  # OpenAI and vLLM: a tool_choice needs tools
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in self.tool_names():
            raise APIError(400, f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools "
                                f"({', '.join(self.tool_names())})", param="tool_choice")
        if len(set(self.tool_names())) != len(self.tool_names()):
            raise APIError(400, "tools name a function twice", param="tools")
        return self

    def tool_names(self) -> list[str]:
        return [t.function.name for t in self.tools or ()]

    def tool_mode(self) -> ToolMode | None:
        """How the response reads calls from the output (None: tool_choice "none")."""
        choice = self.tool_choice
        if choice in (None, "none"):
            return None
        if isinstance(choice, NamedToolChoice):
            return ToolMode("named", choice.function.name)
        return ToolMode(choice, single=not self.parallel_tool_calls)  # type: ignore[arg-type]

    def structured(self) -> dict[str, Any] | None:
        """A named or required tool_choice holds the output to its calls' JSON, and excludes another
        constraint."""
        own = super().structured()
        choice = self.tool_choice
        if choice != "required" and not isinstance(choice, NamedToolChoice):
            return own
        if own is not None:
            raise APIError(400, "a named or required tool_choice constrains the output itself; it excludes "
                                "response_format and structured_outputs", param="tool_choice")
        if choice == "required":
            return {"json": required_schema(self.tools or [], not self.parallel_tool_calls)}
        spec = next(t.function for t in self.tools or () if t.function.name == choice.function.name)
        return {"json": spec.parameters or {"type": "object"}}

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
