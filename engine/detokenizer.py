"""Incremental detokenisation: each step decodes only the new ids in a short context, not the whole output.

Fast (Rust-backed) tokenizers stream through tokenizers' DecodeStream: a few µs a token, where a
transformers decode() call costs about 15-20 µs, twice per token (at batch 256, ~8 ms of host time a
step). Other tokenizers, and tokenizers releases without DecodeStream(ids=...), decode a window that
starts a few tokens before the new ones, because decoders (byte-level BPE, Metaspace) render a token
differently at the start of a string. Either way text is released only once it no longer ends in an
incomplete UTF-8 sequence, so the emitted text only ever grows, and it equals
tokenizer.decode(output ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
(tests/test_detokenizer.py checks both paths against it; skip_special_tokens is the request's, True by
default as in vLLM).
"""
from __future__ import annotations

from typing import Any, Optional

CONTEXT_TOKENS = 5


def decode_stream(tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool = True
                  ) -> Optional[tuple[Any, Any]]:
    """(DecodeStream primed with the prompt, the Rust tokenizer it steps with), or None if unavailable."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        from tokenizers.decoders import DecodeStream

        return DecodeStream(ids=list(prompt_ids), skip_special_tokens=skip_special_tokens), backend
    except (ImportError, TypeError):  # tokenizers < 0.22 has no DecodeStream(ids=...)
        return None


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stream: bool = True,
                 skip_special_tokens: bool = True) -> None:
        """``stream=False`` forces the windowed decode (tests compare the two)."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.prefix_offset = max(len(prompt_ids) - CONTEXT_TOKENS, 0)
        self.read_offset = len(prompt_ids)
        self._stream = decode_stream(tokenizer, prompt_ids, skip_special_tokens) if stream else None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def step(self, all_ids: list[int], end: Optional[int] = None) -> str:
        """The new text contributed by ``all_ids[:end]`` since the last call (maybe empty)."""
        end = len(all_ids) if end is None else end
        if self._stream is not None:
            stream, backend = self._stream
            pieces = [stream.step(backend, t) for t in all_ids[self.read_offset:end]]
            self.read_offset = end
            return "".join(p for p in pieces if p)
        prefix_text = self._decode(all_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(all_ids[self.prefix_offset:end])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, end
        return full_text[len(prefix_text):]
