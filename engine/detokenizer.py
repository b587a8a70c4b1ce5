"""Incremental detokenisation: each step decodes only a short window of ids, not the whole output.

The window starts a few tokens before the new ones, because decoders (byte-level BPE, Metaspace) render
a token differently at the start of a string; text is released only once it no longer ends in an
incomplete UTF-8 sequence (U+FFFD), so the emitted text only ever grows.
"""
from __future__ import annotations

from typing import Any, Optional

CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.prefix_offset = max(len(prompt_ids) - CONTEXT_TOKENS, 0)
        self.read_offset = len(prompt_ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def step(self, all_ids: list[int], end: Optional[int] = None) -> str:
        """The new text contributed by ``all_ids[:end]`` since the last call (maybe empty)."""
        end = len(all_ids) if end is None else end
        prefix_text = self._decode(all_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(all_ids[self.prefix_offset:end])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, end
        return full_text[len(prefix_text):]
