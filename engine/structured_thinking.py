"""Structured outputs after a reasoning model's thinking (an engine with a ``reasoning_parser``).

As in vLLM, the constraint holds the answer, not the thinking: tokens pass unmasked until the thinking
ends with the ``</think>`` token, and the grammar starts from its beginning at the next token. Where the
thinking starts follows rast_engine.reasoning's parsers (output_start), on the prompt's last non-blank
token instead of its text:
- ``thinking``: the output starts inside it (deepseek_r1; qwen3 when that token is ``<think>``);
- ``undecided`` (qwen3 otherwise): the first token is the grammar's or ``<think>``; ``<think>`` opens the
  thinking, any other token is the grammar's first. So a model that does not think is held to the
  grammar from its first token, and one that does is not held inside its thinking;
- ``grammar``: the constraint, as without a reasoning parser: after ``</think>``, or from the start when
  the prompt ends with it (Qwen3's template with enable_thinking false closes the thinking itself).

ThinkingMatcher wraps xgrammar's matcher with the few calls the engine makes of one (accept_token,
is_terminated, fork, stop_token_ids), so the sequences' matchers and the speculative rounds' forked
walks (engine/speculative/grammar.py) take either; structured.bitmasks fills the masks of the phases.
Both tags must be single tokens of the vocabulary, as they are in the Qwen3, QwQ and DeepSeek-R1
tokenizers; a request is refused otherwise rather than constrained from a point the text alone decides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from rast_engine.errors import RastError
from rast_engine.reasoning import CLOSE, OPEN, Parser, output_start

Phase = Literal["thinking", "undecided", "grammar"]


def _single_token(tokenizer: Any, tag: str, vocab: int) -> Optional[int]:
    ids = tokenizer.encode(tag, add_special_tokens=False)
    return ids[0] if len(ids) == 1 and ids[0] < vocab and tokenizer.decode(ids) == tag else None


@dataclass(frozen=True)
class ThinkingTags:
    """An engine's reasoning parser and its tags' token ids (None: the tokenizer splits that tag)."""
    parser: Parser
    open_id: Optional[int]
    close_id: Optional[int]

    @classmethod
    def of(cls, parser: Parser, tokenizer: Any, vocab: int) -> ThinkingTags:
        return cls(parser, _single_token(tokenizer, OPEN, vocab), _single_token(tokenizer, CLOSE, vocab))

    def check(self) -> None:
        if self.open_id is None or self.close_id is None:
            raise RastError(f"with reasoning_parser={self.parser!r} a structured output starts after the thinking's "
                            f"{CLOSE}, which needs {OPEN} and {CLOSE} to be single tokens of the vocabulary; this "
                            "tokenizer splits them (or gives an id past the models' vocabulary)", param="structured_outputs")

    def first_phase(self, prompt_ids: list[int], blank: Any) -> Phase:
        """The phase of a sequence's first output token; ``blank(id)``: the token's text is whitespace."""
        last = next((t for t in reversed(prompt_ids) if not blank(t)), None)
        start = output_start(self.parser, last == self.open_id, last == self.close_id)
        return "grammar" if start == "answer" else start


class ThinkingMatcher:
    """xgrammar's matcher (``inner``) behind the thinking: what the engine calls of a matcher, phase aware."""

    def __init__(self, inner: Any, tags: ThinkingTags, phase: Phase) -> None:
        self.inner, self.tags, self.phase = inner, tags, phase

    @property
    def stop_token_ids(self) -> Any:
        return self.inner.stop_token_ids

    def accept_token(self, token: int) -> bool:
        if self.phase == "undecided":
            if token == self.tags.open_id:
                self.phase = "thinking"
                return True
            self.phase = "grammar"
        if self.phase == "thinking":
            if token == self.tags.close_id:
                self.phase = "grammar"
            return True
        return bool(self.inner.accept_token(token))

    def is_terminated(self) -> bool:
        return self.phase == "grammar" and bool(self.inner.is_terminated())

    def fork(self) -> ThinkingMatcher:
        return ThinkingMatcher(self.inner.fork(), self.tags, self.phase)
