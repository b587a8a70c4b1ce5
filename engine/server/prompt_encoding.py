"""A text prompt's token ids, on the server's tokenizer thread (async_engine.py), with a cheap refusal of
text far longer than the context.

Encoding costs about a microsecond a character, and a prompt longer than the context is refused only
once its length in tokens is known: a 9 MB body took 14 s to encode before its 400. So a text of more
than ``CHARS_PER_CONTEXT_TOKEN`` characters per context token is first encoded only up to a whitespace
near that length: if that prefix alone holds more tokens than the context, so does the whole text, and it
is refused after encoding a bounded prefix.

Why the prefix bound holds, and where (``prefix_refusal_sound``): byte-level BPE with GPT-2's, Qwen2's
or Llama 3's pre-tokenizer regex splits text into pre-tokens before merging within each, and no pattern
of those regexes takes a letter or digit and then a non-letter-or-digit into one pre-token. So cut at a
whitespace character after a letter or digit, the prefix's tokens are a prefix of the text's. Qwen2's
NFC normalizer runs first: the character before the cut must be NFC-stable, since a few letters (U+0958,
U+FB2A) decompose into a letter and a combining mark, which would join a following newline. Other
tokenizers (SentencePiece-style BPE, other regexes) are encoded whole, as are texts with no such cut
near the limit or whose tokens are long (runs of one character).
"""
from __future__ import annotations

import json
import unicodedata
from typing import Any

from rast_engine.errors import RastError

CHARS_PER_CONTEXT_TOKEN = 8  # English averages about 4 characters a token, code 3, CJK under 2
CUT_WINDOW = 4096  # characters searched back from the limit for a cut: a bounded host scan
# the pre-tokenizer regexes the argument was checked for (Qwen2 and Qwen3; Llama 3), besides ByteLevel's own
_REGEXES = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
            r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def prefix_refusal_sound(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is byte-level BPE pre-tokenised by one of the regexes the prefix argument
    holds for, with no normalizer or NFC."""
    try:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
    except Exception:  # noqa: BLE001 - not a fast tokenizer: the argument was not checked for it
        return False
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    known = [p for p in parts if (p.get("type") == "ByteLevel" and (p.get("use_regex") or len(parts) > 1))
             or (p.get("type") == "Split" and (p.get("pattern") or {}).get("Regex") in _REGEXES)]
    return (spec.get("model", {}).get("type") == "BPE" and bool(parts) and len(known) == len(parts)
            and (norm is None or norm.get("type") == "NFC"))


def encode_prompt(tokenizer: Any, prompt: str | list[int], add_special_tokens: bool, max_model_len: int,
                  refuse_from_prefix: bool) -> list[int]:
    """``prompt``'s token ids (token ids pass through); ``refuse_from_prefix``: the prompt is kept whole
    (no truncate_prompt_tokens) and prefix_refusal_sound(tokenizer), so a text that cannot fit the
    context may be refused from a prefix."""
    if not isinstance(prompt, str):
        return prompt
    if tokenizer is None:
        raise RastError("this model has no tokenizer (load_format='dummy'): send prompts as token ids")
    try:
        if refuse_from_prefix and len(prompt) > CHARS_PER_CONTEXT_TOKEN * max_model_len:
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
    """The largest i in (limit - CUT_WINDOW, limit] where text[i] is whitespace and text[i - 1] an
    NFC-stable letter or digit (0: none)."""
    for i in range(limit, max(0, limit - CUT_WINDOW), -1):
        if text[i].isspace() and text[i - 1].isalnum() and unicodedata.is_normalized("NFC", text[i - 1]):
            return i
    return 0
