"""vLLM's /tokenize, /detokenize and /tokenizer_info: the server's own tokenizer and chat template, so a
client (lm-evaluation-harness' remote tokenizer, for one) counts and builds prompts exactly as the engine
will read them. ``model`` may be left out, as vLLM allows. They never touch the engine's queue."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt, model_validator
from rast_engine.server.api_error import APIError
from rast_engine.server.chat_messages import ChatMessage, render_chat
from rast_engine.server.tools import Tool


class TokenizeRequest(BaseModel):
    """A prompt, or chat messages rendered by the chat template (vLLM's two request shapes in one).
    add_special_tokens defaults to True for a prompt and to False for messages (the template writes them)."""
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[Tool] | None = None  # vLLM's: the functions the chat template lists
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[StrictInt]


def _require(tokenizer: Any) -> Any:
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer (load_format='dummy')")
    return tokenizer


def tokenize(tokenizer: Any, req: TokenizeRequest, max_model_len: int) -> dict[str, Any]:
    tok = _require(tokenizer)
    if req.messages is not None:
        if getattr(tok, "chat_template", None) is None:
            raise APIError(400, "this model's tokenizer has no chat template; send a prompt", param="messages")
        text = render_chat(tok, req.messages, req.add_generation_prompt, req.chat_template_kwargs,
                           req.continue_final_message, req.tools)
        special = bool(req.add_special_tokens)
    else:
        text, special = req.prompt, req.add_special_tokens is not False
    try:
        ids = list(tok.encode(text, add_special_tokens=special))
    except Exception as exc:  # noqa: BLE001 - e.g. a lone surrogate: the client's input
        raise APIError(400, f"the tokenizer cannot encode the input: {exc}",
                       param="prompt" if req.prompt is not None else "messages") from None
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids,
            "token_strs": tok.convert_ids_to_tokens(ids) if req.return_token_strs else None}


def tokenizer_info(tokenizer: Any, max_model_len: int, vocab_size: int) -> dict[str, Any]:
    """The special tokens (as text), the chat template and the sizes a remote tokenizer needs."""
    tok = _require(tokenizer)
    special = {name: getattr(tok, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    template = getattr(tok, "chat_template", None)
    return {"tokenizer_class": type(tok).__name__, **{k: v if isinstance(v, str) else None for k, v in special.items()},
            "chat_template": template if isinstance(template, str) else None, "model_max_length": max_model_len,
            "vocab_size": vocab_size}


def detokenize(tokenizer: Any, req: DetokenizeRequest, vocab_size: int) -> dict[str, Any]:
    tok = _require(tokenizer)
    outside = [t for t in req.tokens if not 0 <= t < vocab_size]
    if outside:
        raise APIError(400, f"token ids {outside[:5]} are outside the vocabulary [0, {vocab_size})", param="tokens")
    try:
        return {"prompt": tok.decode(req.tokens)}
    except Exception as exc:  # noqa: BLE001 - ids the tokenizer has no entry for (vocabulary padding)
        raise APIError(400, f"the tokenizer cannot decode these ids: {exc}", param="tokens") from None
