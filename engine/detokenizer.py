"""Incremental detokenisation: each step decodes only the new ids in a short context, not the whole output.

Fast (Rust-backed) tokenizers stream through tokenizers' DecodeStream: a few µs a token, where a
transformers decode() call costs about 15-20 µs, twice per token (at batch 256, ~8 ms of host time a
step). Other tokenizers, and tokenizers releases without DecodeStream(ids=...), decode a window that
starts a few tokens before the new ones, because decoders (byte-level BPE, Metaspace) render a token
differently at the start of a string. Either way text is released only once it no longer ends in
U+FFFD (an incomplete, or invalid, UTF-8 tail), so the emitted text only ever grows, and ``flush`` releases
what is still held when the sequence ends. The text of a finished sequence equals
tokenizer.decode(output ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
(tests/test_detokenizer.py checks both paths against it; skip_special_tokens is the request's, True by
default as in vLLM), with two exceptions, both as in vLLM:
- a prompt that ends inside a character: the output's first bytes complete it, and the character is output
  text (the prompt's own decode shows it as U+FFFD);
- a byte-fallback decoder (SentencePiece's <0xNN> pieces) that turns bytes it already rendered into U+FFFD
  once a later byte makes their group invalid: text already emitted stands, and the stream goes on in the
  windowed decode (DecodeStream raises "Invalid prefix" there).
"""
from __future__ import annotations

from typing import Any, Optional

CONTEXT_TOKENS = 5
MAX_CHAR_TOKENS = 3  # an incomplete UTF-8 character is at most 3 bytes, so at most 3 byte tokens


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
        # invariant: the text of ids[:read_offset] has been released (the prompt's counts as released), and
        # ids[prefix_offset:read_offset] is the context the next tokens are decoded after
        cut = self._clean_end(prompt_ids)
        self.read_offset = len(prompt_ids) if cut is None else cut
        self.prefix_offset = max(self.read_offset - CONTEXT_TOKENS, 0)
        # the prompt's incomplete last character, as its own decode shows it: the first text released
        # starts with it unless the output's first bytes completed the character
        self._prompt_tail = ""
        if self.read_offset < len(prompt_ids):
            window = self._decode(prompt_ids[self.prefix_offset:])
            clean = self._decode(prompt_ids[self.prefix_offset:self.read_offset])
            self._prompt_tail = window[len(clean):] if window.startswith(clean) else ""
        self._fed = len(prompt_ids)  # ids the stream has stepped
        self._stream = None
        if stream and cut is not None:  # a prompt ending in invalid bytes decodes windowed
            self._stream = decode_stream(tokenizer, prompt_ids[:cut], skip_special_tokens)
            if self._stream is not None:
                stream_, backend = self._stream
                for t in prompt_ids[cut:]:  # an incomplete last character: held, completed by the output
                    stream_.step(backend, t)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _clean_end(self, prompt_ids: list[int]) -> Optional[int]:
        """The end of the prompt's last complete character: len(prompt_ids), or a few tokens before it when
        it ends inside a character; None when no such end is near (the prompt ends in invalid bytes)."""
        for cut in range(len(prompt_ids), max(len(prompt_ids) - MAX_CHAR_TOKENS, 0) - 1, -1):
            if cut == 0 or not self._decode(prompt_ids[max(cut - CONTEXT_TOKENS, 0):cut]).endswith("\ufffd"):
                return cut
        return None

    def _released(self, all_ids: list[int], end: int, hold_incomplete: bool = True) -> str:
        """The windowed decode: the text of ids[read_offset:end] after its context, advancing the offsets
        when released (never while it ends in U+FFFD and ``hold_incomplete``)."""
        prefix_text = self._decode(all_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(all_ids[self.prefix_offset:end])
        if len(full_text) <= len(prefix_text) or (hold_incomplete and full_text.endswith("\ufffd")):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, end
        return full_text[len(prefix_text):]

    def _output_text(self, text: str) -> str:
        """Released text without the prompt's incomplete character, where the output did not complete it."""
        if text and self._prompt_tail:
            text = text.removeprefix(self._prompt_tail)
            self._prompt_tail = ""
        return text

    def step(self, all_ids: list[int], end: Optional[int] = None) -> str:
        """The new text contributed by ``all_ids[:end]`` since the last call (maybe empty)."""
        end = len(all_ids) if end is None else end
        return self._output_text(self._step(all_ids, end))

    def _step(self, all_ids: list[int], end: int) -> str:
        if self._stream is None:
            return self._released(all_ids, end)
        stream, backend = self._stream
        text = ""
        for i in range(self._fed, end):
            try:
                piece = stream.step(backend, all_ids[i])
            except Exception:  # tokenizers' "Invalid prefix": the decoder rewrote text it had released
                self._stream = None
                return text + self._released(all_ids, end)
            if piece:
                text += piece
                self.prefix_offset, self.read_offset = self.read_offset, i + 1
        self._fed = end
        return text

    def flush(self, all_ids: list[int], end: Optional[int] = None) -> str:
        """The text of ``all_ids[:end]`` still held back (it ends in U+FFFD): at the sequence's end there is
        nothing more to wait for. The detokenizer takes no tokens after it."""
        end = len(all_ids) if end is None else end
        self._stream = None
        return self._output_text(self._released(all_ids, end, hold_incomplete=False)) if end > self.read_offset else ""
