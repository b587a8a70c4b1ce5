"""Reasoning outputs: a chat choice's ``<think>…</think>`` text apart from its answer (vLLM's
``--reasoning-parser``).

A reasoning model writes its thinking between ``<think>`` and ``</think>``, then the answer. With a parser
the server returns the thinking in the message's ``reasoning`` (and vLLM's older name
``reasoning_content``) and the rest in ``content``. The two parsers differ only in where thinking starts:
- ``deepseek_r1``: the output starts inside the thinking (DeepSeek-R1, its distills and QwQ open
  ``<think>`` in the chat template, or the model writes it first); all text up to ``</think>`` is
  reasoning, and an output cut before ``</think>`` is reasoning alone.
- ``qwen3``: the output is thinking when it opens with ``<think>`` (Qwen3's thinking mode) or when the
  rendered prompt ends inside an open ``<think>`` (Qwen3-Thinking-2507's template); otherwise it is all
  answer.
Under either, a prompt that ends with ``</think>`` (the template closed the thinking: Qwen3's with
``enable_thinking: false``) leaves an output that is all answer, as vLLM's parsers read such a prompt.

Invariant: a choice's text is split by one state machine whether it arrives whole or in stream deltas,
and the split does not depend on where the deltas fall, so a stream's reasoning and content deltas join
to the non-streamed message's fields. What it cannot decide yet (a possible tag prefix at the end, the
whitespace that trails the thinking) it holds back until more text or the end decides it. As in the
chat templates that replay these messages, the whitespace around each part is not part of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OPEN, CLOSE = "<think>", "</think>"
PARSERS = ("deepseek_r1", "qwen3")
Parser = Literal["deepseek_r1", "qwen3"]
_State = Literal["start", "reasoning", "content"]
# where an output starts: in the thinking, after it, or (qwen3) where its first text says
Start = Literal["thinking", "undecided", "answer"]


def tag_prefix_len(text: str, tag: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def output_start(parser: Parser, ends_open: bool, ends_closed: bool) -> Start:
    """Where an output starts, from how its prompt ends: inside an open <think>, after a </think>, or
    neither."""
    if ends_closed:
        return "answer"
    return "thinking" if ends_open or parser == "deepseek_r1" else "undecided"


def prompt_start(parser: Parser, prompt: str) -> Start:
    """output_start of the rendered prompt's text."""
    tail = prompt.rstrip()
    return output_start(parser, tail.endswith(OPEN), tail.endswith(CLOSE))


@dataclass
class ReasoningSplitter:
    """One choice's text, fed in order, split into (new reasoning, new content) per feed."""
    start: Start  # prompt_start
    state: _State = "start"
    held: str = ""  # text read but not yet given to either part
    leading: bool = True  # no text given to the current part yet: its leading whitespace is dropped

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.held += text
        reasoning, content = "", ""
        if self.state == "start" and self.start == "answer":
            self.state = "content"
        if self.state == "start":
            head = self.held.lstrip()
            if head.startswith(OPEN):
                self.held, self.state = head[len(OPEN):], "reasoning"
            elif OPEN.startswith(head) and not final:
                return "", ""  # may still become "<think>": wait for the next text
            else:
                self.state = "reasoning" if self.start == "thinking" else "content"
        if self.state == "reasoning":
            end = self.held.find(CLOSE)
            if end < 0:
                keep = len(self.held) if final else len(self.held) - tag_prefix_len(self.held, CLOSE)
                # trailing whitespace waits: if "</think>" follows it, it is not part of the reasoning
                sure = self.held[:keep].rstrip()
                reasoning, self.held = self._give(sure), self.held[len(sure):]
                if final:
                    self.held = ""
                return reasoning, ""
            reasoning = self._give(self.held[:end].rstrip())
            self.held, self.state, self.leading = self.held[end + len(CLOSE):], "content", True
        content, self.held = self._give(self.held), ""
        return reasoning, content

    def _give(self, text: str) -> str:
        if self.leading:
            text = text.lstrip()
            self.leading = not text
        return text


def split_reasoning(parser: Parser, prompt: str, text: str) -> tuple[str, str]:
    """A whole output's (reasoning, content)."""
    return ReasoningSplitter(prompt_start(parser, prompt)).feed(text, final=True)
