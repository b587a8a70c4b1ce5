"""A request body's SamplingParams: OpenAI's and vLLM's fields mapped onto the engine's, the fields a
request omits filled from the generation config, bad values answered with an APIError(400) naming the
field."""
from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Optional

from rast_engine.errors import RastError
from rast_engine.generation_config import fill
from rast_engine.requests import check_token_ids
from rast_engine.sampling_params import SamplingParams
from rast_engine.server.processor_names import resolve
from rast_engine.server.protocol import APIError, ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from rast_engine.llm_engine import LLMEngine


def sampling_params(req: CompletionRequest | ChatCompletionRequest, logprobs: int | None,
                    max_tokens: int | None, engine: LLMEngine, pattern: Optional[re.Pattern[str]] = None
                    ) -> SamplingParams:
    """The request's SamplingParams; the filters it omits take the generation config's values. ``pattern``:
    the logits processor names the server allows (processor_names.py)."""
    vocab_size = engine.vocab_size
    if max_tokens is not None and req.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({req.min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens")
    logit_bias = req.logit_bias_ids()
    try:
        check_token_ids("logit_bias", logit_bias, vocab_size)
        check_token_ids("allowed_token_ids", req.allowed_token_ids, vocab_size)
    except RastError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    try:
        return SamplingParams(
            n=req.n, **fill(engine.sampling_defaults, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                            min_p=req.min_p, repetition_penalty=req.repetition_penalty),
            # placeholder, at least min_tokens: the engine thread sets it once the prompt is tokenised
            max_tokens=max(1, req.min_tokens), min_tokens=req.min_tokens, logit_bias=logit_bias,
            allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words, structured_outputs=req.structured(),
            truncate_prompt_tokens=req.truncate_prompt_tokens,
            stop=req.stop_list() or None, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
            seed=req.seed, lam=req.lam, plausibility_alpha=req.plausibility_alpha, logprobs=logprobs,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            include_stop_str_in_output=req.include_stop_str_in_output, skip_special_tokens=req.skip_special_tokens,
            logits_processors=resolve(req.logits_processors, pattern),
            output_kind="delta")  # O(new tokens) a step for the engine thread, see responses.py
    except ValueError as exc:
        raise APIError(400, str(exc), param=getattr(exc, "param", None)) from None


def echoed(req: CompletionRequest) -> list[str | None]:
    """Each prompt's text for echo: as sent, or (token ids, a truncated prompt) the text of the ids read."""
    return [p if isinstance(p, str) and req.truncate_prompt_tokens is None else None for p in req.prompts()]


def completion_params(req: CompletionRequest, engine: LLMEngine, pattern: Optional[re.Pattern[str]] = None
                      ) -> SamplingParams:
    params = sampling_params(req, req.logprobs, req.max_tokens, engine, pattern)
    # echo with logprobs gives the prompt's tokens logprobs too: the engine scores the larger top k
    asked = [k for k in (req.prompt_logprobs_count(), req.logprobs if req.echo else None) if k is not None]
    return dataclasses.replace(params, prompt_logprobs=max(asked)) if asked else params


def chat_params(req: ChatCompletionRequest, engine: LLMEngine, pattern: Optional[re.Pattern[str]] = None
                ) -> SamplingParams:
    params = sampling_params(req, req.logprobs_count(), req.max_new_tokens(), engine, pattern)
    k = req.prompt_logprobs_count()
    return params if k is None else dataclasses.replace(params, prompt_logprobs=k)


def fit_to_context(params: SamplingParams, max_tokens: int | None, prompt_len: int, max_model_len: int,
                   default: int | None) -> SamplingParams:
    """OpenAI semantics: the prompt plus max_tokens must fit the context; no max_tokens means
    'the rest of the context', or ``default`` (the generation config's max_new_tokens) where that is less
    (but never below the request's min_tokens)."""
    room = max_model_len - prompt_len
    if room <= 0:
        raise RastError(f"the prompt has {prompt_len} tokens, but the model's context holds "
                        f"{max_model_len}; shorten the prompt")
    if max_tokens is None:
        max_tokens = room if default is None else min(room, max(default, params.min_tokens))
        if params.min_tokens > room:
            raise RastError(f"min_tokens={params.min_tokens}, but the model's context holds {max_model_len} "
                            f"tokens and the prompt has {prompt_len}: at most {room} can be generated",
                            param="min_tokens")
    elif max_tokens > room:
        raise RastError(f"the model's context holds {max_model_len} tokens, but "
                        f"{prompt_len + max_tokens} were requested ({prompt_len} in the "
                        f"prompt, {max_tokens} in max_tokens); lower max_tokens", param="max_tokens")
    return dataclasses.replace(params, max_tokens=max_tokens)
