"""A text prompt's token ids, on the server's tokenizer thread (async_engine.py), with a cheap refusal of
text far longer than the context.

Encoding costs about a microsecond a character, and a prompt longer than the context is refused only
once its length in tokens is known: a 9 MB body took 14 s to encode before its 400. So a text of more
than ``CHARS_PER_CONTEXT_TOKEN`` characters per context token is first encoded only up to a whitespace
near that length: if that prefix alone holds more tokens than the context, so does the whole text, and it
is refused after encoding a bounded prefix. Why the prefix bound holds: byte-level BPE (Qwen, Llama 3)
splits text into pre-tokens by a regex before merging within each, and a pre-token that ends in a letter
or digit ends there whatever follows when a whitespace character does (no pattern of those regexes
takes a letter or a digit and then whitespace into one pre-token), so cut there the prefix's tokens are
a prefix of the text's. A text with no such cut, or whose tokens are long (runs of one character),
passes the check and is encoded whole, as before.
"""
from __future__ import annotations

from typing import Any

from rast_engine.errors import RastError

CHARS_PER_CONTEXT_TOKEN = 8  # English averages about 4 characters a token, code 3, CJK under 2


def encode_prompt(tokenizer: Any, prompt: str | list[int], add_special_tokens: bool, max_model_len: int,
                  whole: bool) -> list[int]:
    """``prompt``'s token ids (token ids pass through); ``whole``: the prompt is kept whole (no
    truncate_prompt_tokens), so a text that cannot fit the context may be refused from a prefix."""
    if not isinstance(prompt, str):
        return prompt
    if tokenizer is None:
        raise RastError("this model has no tokenizer (load_format='dummy'): send prompts as token ids")
    try:
        if whole and len(prompt) > CHARS_PER_CONTEXT_TOKEN * max_model_len:
            cut = _whitespace_cut(prompt, CHARS_PER_CONTEXT_TOKEN * max_model_len)
            if cut and len(tokenizer.encode(prompt[:cut], add_special_tokens=add_special_tokens)) >= max_model_len:
                raise RastError(f"the prompt has more than {max_model_len} tokens (its first {cut} of "
                                f"{len(prompt)} characters alone do), but the model's context holds "
                                f"{max_model_len}; shorten the prompt")
        return tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    except RastError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a lone surrogate: the client's input, not the engine
        raise RastError(f"the tokenizer cannot encode the prompt: {exc}") from None


def _whitespace_cut(text: str, limit: int) -> int:
    """The largest i <= limit where text[i] is whitespace and text[i - 1] a letter or digit (0: none)."""
    i = limit
    while i > 0 and not (text[i].isspace() and text[i - 1].isalnum()):
        i -= 1
    return i
