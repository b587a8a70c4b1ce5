"""A token's own bytes, for the chat API's logprobs ``bytes`` field.

OpenAI documents ``bytes`` as the token's UTF-8 bytes, which a client joins to rebuild characters that
are split across tokens. Encoding the token's decoded text cannot do that: a token holding part of a
multi-byte character decodes to U+FFFD. The bytes come from the token's vocabulary entry instead:
- byte-level BPE (GPT-2's scheme; Qwen2, Llama 3): each character of the entry stands for one byte, by
  GPT-2's printable-byte table, inverted here;
- SentencePiece byte fallback (Llama 2 style): an entry ``<0xC3>`` is that byte, and ``▁`` in an entry is
  the space it stands for (decoding the token alone strips a word's leading space);
Added tokens (``<|im_start|>``, ``</s>``) and every other entry keep their decoded text's bytes.
"""
from __future__ import annotations

import re
import weakref
from typing import Any

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's table inverted: printable Latin-1 bytes stand for themselves, the other 68 bytes for the
    characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in printable)
    out.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return out


_BYTE_OF = _unicode_to_byte()
_KINDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (byte_level, added ids)


def _kind(tokenizer: Any) -> tuple[bool, frozenset[int]]:
    kind = _KINDS.get(tokenizer)
    if kind is None:
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        kind = (type(decoder).__name__ == "ByteLevel", frozenset(getattr(tokenizer, "added_tokens_decoder", {})))
        _KINDS[tokenizer] = kind
    return kind


def token_bytes(tokenizer: Any, token_id: int) -> list[int]:
    """The bytes that token ``token_id`` contributes to the text."""
    byte_level, added = _kind(tokenizer)
    if token_id not in added:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if byte_level and all(c in _BYTE_OF for c in piece):
                return [_BYTE_OF[c] for c in piece]
            match = None if byte_level else _BYTE_PIECE.fullmatch(piece)
            if match:
                return [int(match.group(1), 16)]
            if not byte_level and "\u2581" in piece:  # SentencePiece's word marker: a lone token's decode drops it
                return list(piece.replace("\u2581", " ").encode())
    return list(tokenizer.decode([token_id]).encode())
