"""Request intake: everything a request must satisfy, checked before the engine changes any state, so a
rejected request leaves the engine exactly as it was."""
from __future__ import annotations

import inspect
import operator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Collection, Iterable, Optional, Union

from rast_engine.errors import RastError
from rast_engine.bad_words import tokenize_bad_words
from rast_engine.logit_adjust import min_tokens_bans
from rast_engine.structured import RequestGrammar, engine_grammars
from rast_engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from rast_engine.llm_engine import LLMEngine


PROMPT_KEYS = ("prompt", "prompt_token_ids")  # vLLM's TextPrompt and TokensPrompt
SALT_KEY = "cache_salt"  # vLLM's: either may carry one (prompt_salt)


def prompt_of(prompt: Union[str, list[int], dict]) -> Union[str, list[int]]:
    """The text or token ids a prompt holds: vLLM's dict prompts ({"prompt": text}, {"prompt_token_ids":
    ids}) are taken as what they hold; fields this engine has no use for (multi-modal data) are refused."""
    if not isinstance(prompt, dict):
        return prompt
    extra = sorted(map(str, set(prompt) - {*PROMPT_KEYS, SALT_KEY}))
    if extra:
        raise RastError(f"prompt fields {extra} are not supported: a dict prompt holds 'prompt' (text) or "
                        "'prompt_token_ids', and optionally 'cache_salt'")
    given = [k for k in PROMPT_KEYS if k in prompt]
    if len(given) != 1:
        raise RastError("a dict prompt holds exactly one of 'prompt' (text) or 'prompt_token_ids'")
    value = prompt[given[0]]
    if isinstance(value, str) != (given[0] == "prompt"):  # each key holds its own kind: no text as ids
        raise RastError("'prompt' holds text and 'prompt_token_ids' a list of token ids (ints)")
    return value


def prompt_salt(prompt: Union[str, list[int], dict]) -> Optional[str]:
    """A dict prompt's cache_salt (vLLM's): a request's prompt reuses only the prefix-cache blocks of
    requests with the same salt, so tenants that do not share it cannot probe each other's prompts
    through the cache's timing. None: no salt (a non-empty string otherwise)."""
    salt = prompt.get(SALT_KEY) if isinstance(prompt, dict) else None
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise RastError(f"cache_salt must be a non-empty string, got {salt!r}")
    return salt


def prompt_ids(engine: LLMEngine, prompt: Union[str, list[int]]) -> list[int]:
    """The prompt's token ids, each one every model embeds: V is min(len(tokenizer), every model's width),
    so a text's ids are checked as given ids are (a narrow model would fail the whole batch's forward)."""
    if isinstance(prompt, str):
        if engine.tokenizer is None:
            raise RastError("this engine has no tokenizer (its load_format='dummy' model directories hold "
                            "no tokenizer files): give prompts as lists of token ids")
        try:  # "" may encode to [BOS]; an encoding with no token is refused after truncation
            ids = list(engine.tokenizer.encode(prompt))
        except Exception as exc:  # noqa: BLE001 - e.g. a lone surrogate: bad input, reported as such
            raise RastError(f"the tokenizer cannot encode the prompt: {exc}") from None
    else:
        ids = token_id_list(prompt)
    bad = [t for t in ids if not 0 <= t < engine.vocab_size]
    if bad and isinstance(prompt, str):
        raise RastError(f"the prompt encodes to token ids {bad[:5]} outside the vocabulary "
                        f"[0, {engine.vocab_size}) that every model embeds (a model is narrower than the "
                        f"tokenizer's {len(engine.tokenizer)} tokens)")
    if bad:
        raise RastError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {engine.vocab_size})")
    return ids


_INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def _integer(t: object) -> bool:
    """An integer, never a bool: Python's, numpy's (np.bool_ has __index__ before numpy 2.3) or torch's."""
    return hasattr(t, "__index__") and not isinstance(t, bool) and not str(getattr(t, "dtype", "")).endswith("bool")


def _int_vector(x: object) -> bool:
    return hasattr(x, "tolist") and getattr(x, "ndim", None) == 1 and str(getattr(x, "dtype", "")).split(".")[-1] \
        in _INT_DTYPES


def is_one_prompt_of_ids(x: object) -> bool:
    """Whether ``x`` is one prompt of token ids (its first id an integer, or a 1-D integer array), not a
    batch of prompts."""
    return _int_vector(x) or (isinstance(x, (list, tuple)) and bool(x) and _integer(x[0]))


def token_id_list(prompt: object) -> list[int]:
    """Token ids as Python ints: a list or tuple of integers (numpy's too), or a 1-D integer numpy array or
    torch tensor (a tokenizer's return_tensors output, one row); never bools or floats."""
    if _int_vector(prompt):
        return [int(t) for t in prompt.tolist()]  # type: ignore[attr-defined]
    if isinstance(prompt, (list, tuple)) and all(_integer(t) for t in prompt):
        return [operator.index(t) for t in prompt]
    raise RastError("a prompt must be a string or a list of token ids (ints)")


def truncated(ids: list[int], keep: Optional[int], max_model_len: int) -> list[int]:
    """The prompt's last ``keep`` tokens (truncate_prompt_tokens; -1: all that leave room for one
    generated token)."""
    if keep is None:
        return ids
    return ids[-(max_model_len - 1 if keep == -1 else keep):]


def pair_weights(engine: LLMEngine, params: SamplingParams) -> list[float]:
    """λ per small pair for this request: the engine's, or the request's ``lam`` (a number for an engine
    with one pair, else one number per pair in the engine's order)."""
    weights = list(engine.model_set.weights)
    if params.lam is None:
        return weights
    if not weights:
        raise RastError("lam weighs the small pairs' deltas, and this engine has none (it decodes the large "
                        "model alone)", param="lam")
    lam = params.lam if isinstance(params.lam, list) else [float(params.lam)]
    if len(lam) != len(weights):
        given = _count(len(lam), "value") if isinstance(params.lam, list) else "one number"
        raise RastError(f"lam gives {given}; this engine has {_count(len(weights), 'small pair')}, so lam needs one "
                        "number per pair, in the order of the engine's pairs (the main pair, then experts)",
                        param="lam")
    return lam


def chat_template_variables(tokenizer: Any, kwargs: Optional[dict]) -> dict:
    """vLLM's chat_template_kwargs: more variables for the chat template (Qwen3's enable_thinking); a name
    apply_chat_template takes itself (tokenize, add_generation_prompt, ...) is refused, never overridden."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise RastError(f"chat_template_kwargs must map names to values, got {kwargs!r}", param="chat_template_kwargs")
    own = sorted(set(inspect.signature(tokenizer.apply_chat_template).parameters) & set(kwargs))
    if own:
        raise RastError(f"chat_template_kwargs may not set {own}: they are apply_chat_template's own arguments",
                        param="chat_template_kwargs")
    return dict(kwargs)


def render_conversation(tokenizer: Any, conversation: list[dict], what: str, variables: Optional[dict] = None,
                        **options: Any) -> str:
    """The chat template's text of one conversation: ``options`` are apply_chat_template's own, ``variables``
    the checked chat_template_variables; RastError naming ``what`` when the template refuses it."""
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, **options, **(variables or {}))
    except Exception as exc:  # noqa: BLE001 - a template refusing a conversation is the caller's to fix
        raise RastError(f"the chat template rejected {what}: {exc}", param="messages") from None


def check_priority(priority: object, policy: str) -> int:
    """``priority`` as an int; RastError unless it is an integer the engine's scheduling policy can honour
    (vLLM refuses a priority under FCFS rather than ignore it)."""
    try:
        if isinstance(priority, bool):
            raise TypeError
        priority = operator.index(priority)  # any integer, numpy's too, as vLLM takes them; not a bool or float
    except TypeError:
        raise RastError(f"priority must be an integer, got {priority!r}", param="priority") from None
    if priority != 0 and policy != "priority":
        raise RastError(f"priority={priority} needs scheduling_policy='priority' (--scheduling-policy priority); "
                        f"this engine schedules {policy!r}", param="priority")
    return priority


def check_token_ids(name: str, ids: Optional[Iterable[int]], vocab_size: int) -> None:
    """RastError if field ``name`` (logit_bias, allowed_token_ids) names ids the sampler never draws
    (ids >= the vocabulary)."""
    outside = [t for t in ids or () if t >= vocab_size]
    if outside:
        raise RastError(f"{name} names token ids {outside[:5]} outside the vocabulary (size {vocab_size})",
                        param=name)


def check_some_allowed_id_admissible(params: SamplingParams, eos_token_ids: Collection[int]) -> None:
    """RastError if allowed_token_ids names only ids the request masks itself at its first draw: bad words
    of one token and, under min_tokens, the stop and EOS ids (each draw would find no admissible token)."""
    if params.allowed_token_ids is None:
        return
    banned = {w[0] for w in params.bad_words_token_ids or () if len(w) == 1}
    if params.min_tokens > 0:
        banned.update(min_tokens_bans(params, eos_token_ids))
    if banned.issuperset(params.allowed_token_ids):
        why = "bad_words" + (" or, under min_tokens, stop and EOS ids" if params.min_tokens > 0 else "")
        raise RastError(f"allowed_token_ids leaves no token to draw: each of its ids is masked by {why}",
                        param="allowed_token_ids")


def checked_request(engine: LLMEngine, request_id: str, prompt: Union[str, list[int]],
                    params: SamplingParams) -> tuple[list[int], list[float], SamplingParams, Optional[RequestGrammar]]:
    """The prompt's token ids, the request's λ per pair, its own validated copy of ``params`` and its
    compiled structured-output constraint; RastError for anything the engine cannot serve."""
    if not isinstance(request_id, str) or not request_id:
        raise RastError(f"request_id must be a non-empty string, got {request_id!r}")
    if request_id in engine.groups:
        raise RastError(f"request id {request_id!r} is already in use")
    if not isinstance(params, SamplingParams):
        raise RastError(f"params must be a SamplingParams, got {type(params).__name__}")
    # validated again, as a copy: fields set after construction (p.n = 0) are caught here, and the
    # caller changing its object later cannot reach a running request
    params = replace(params)
    ids = prompt_ids(engine, prompt)
    ids = truncated(ids, params.truncate_prompt_tokens, engine.max_model_len)
    if not ids:
        raise RastError("the prompt is empty")
    if len(ids) >= engine.max_model_len:
        raise RastError(f"the prompt has {len(ids)} tokens; max_model_len is {engine.max_model_len} "
                        "(it must leave room for at least one generated token)")
    if params.max_tokens is None:  # up to the end of the context, as vLLM
        room = engine.max_model_len - len(ids)
        if params.min_tokens > room:
            raise RastError(f"min_tokens={params.min_tokens}, but the context (max_model_len "
                            f"{engine.max_model_len}) leaves room for {room} tokens after the prompt",
                            param="min_tokens")
        params = replace(params, max_tokens=room)
    if params.stop_list and engine.tokenizer is None:
        raise RastError("stop strings need a tokenizer to read the text, and this engine has none; "
                        "use stop_token_ids")
    if params.processors is not None and engine.config.speculative_tokens:
        raise RastError("logits_processors cannot run in speculative rounds: a round's drafts stay on the device, "
                        "and a processor reads the output on the host", param="logits_processors")
    check_token_ids("logit_bias", params.logit_bias, engine.vocab_size)
    check_token_ids("allowed_token_ids", params.allowed_token_ids, engine.vocab_size)
    if params.bad_words:
        params.set_bad_words_token_ids(tokenize_bad_words(engine.tokenizer, params.bad_words, engine.vocab_size))
    check_some_allowed_id_admissible(params, engine.scheduler.stops.eos_token_ids)
    for name in ("logprobs", "prompt_logprobs"):
        if (getattr(params, name) or 0) > engine.vocab_size:
            raise RastError(f"{name}={getattr(params, name)} exceeds the vocabulary size {engine.vocab_size}",
                            param=name)
    weights, grammar = pair_weights(engine, params), None
    if params.structured_outputs is not None:
        grammars = engine_grammars(engine)
        grammar = RequestGrammar(grammars, grammars.compile(params.structured_outputs))
    return ids, weights, params, grammar


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
