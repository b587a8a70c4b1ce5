"""OpenAI response bodies and stream chunks from the engine's delta RequestOutputs.

The server asks for output_kind="delta": an output carries only what is new for each choice, so a step
costs the engine thread O(new tokens) however long the completion. A stream chunk is a choice's new
text with the logprobs of the tokens behind it; tokens whose text is still held back (a possible
stop-string prefix, incomplete UTF-8) ride on the next chunk with text, or on the finishing one. A whole
response joins the deltas. With echo (completions) each choice starts with its prompt, and with logprobs
with the prompt tokens' entries (the first one null, as OpenAI's), from the engine's prompt_logprobs.
vLLM's ``prompt_logprobs`` field (not streamed) holds them as vLLM spells them: per prompt token null
(the first) or {token id: {logprob, rank, decoded_token}} for the token and the top k; a completion's
choices carry their prompt's, a chat response carries its one prompt's."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from rast_engine.server.chat_output import ChatParts, Reasoning
from rast_engine.server.tools import ToolMode
from rast_engine.server.token_bytes import token_bytes

Kind = Literal["completion", "chat"]
UNLIKELY = -9999.0  # OpenAI's and vLLM's log-probability for a token that cannot come (JSON has no -inf)


def _finite(logprob: float) -> float:
    """A log-probability as JSON can carry it (a model's non-finite logits give -inf or NaN)."""
    return logprob if math.isfinite(logprob) else UNLIKELY


@dataclass
class _Choice:
    """One choice's deltas so far, and how much of them the stream has sent."""
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[Optional[dict[int, float]]]] = None  # None: not asked for; None entries: echo's first
    echoed: int = 0  # leading prompt tokens (echo), not counted as completion tokens
    finish_reason: Optional[str] = None
    stop_reason: int | str | None = None  # vLLM's field: the stop string or stop token id that ended it
    sent_parts: int = 0
    sent_offset: int = 0  # text_offset after the tokens sent: the sum of their strings' lengths, as body()'s
    sent_tokens: int = 0
    done: bool = False  # its finishing chunk is sent
    parts: Optional[ChatParts] = None  # a chat choice's parsers: the stream's, or the message's


class Formatter:
    def __init__(self, kind: Kind, response_id: str, model: str, request_ids: list[str], n: int,
                 tokenizer: Any, logprobs: int | None, echo: Optional[list[Optional[str]]] = None,
                 prompt_logprobs: int | None = None, generates: bool = True,
                 reasoning: Reasoning | None = None, tools: ToolMode | None = None,
                 token_ids_as_text: bool = False, prompt_details: bool = False,
                 return_token_ids: bool = False) -> None:
        self.kind, self.id, self.model, self.n = kind, response_id, model, n
        # vLLM's --enable-prompt-tokens-details: usage.prompt_tokens_details.cached_tokens, the prompts' tokens
        # read from the prefix cache (RequestOutput.num_cached_tokens)
        self.prompt_details = prompt_details
        self.cached_tokens: dict[str, int] = {}
        # vLLM's return_token_ids: the prompt's ids and each choice's generated ids beside the text (a stream:
        # the prompt's in a choice's first chunk, chat's in its first chunk, each chunk's own new ids)
        self.return_token_ids = return_token_ids
        self.prompt_ids: dict[str, list[int]] = {}
        # chat only: split each choice's thinking from its answer, and read tool calls from the answer
        self.reasoning, self.tools = reasoning, tools
        # False: echo with max_tokens 0, whose one drawn token (the engine draws at least one) is dropped
        self.generates = generates
        self.created = int(time.time())
        self.request_ids = request_ids
        self.prompt_index = {rid: i for i, rid in enumerate(request_ids)}
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.token_ids_as_text = token_ids_as_text  # return_tokens_as_token_ids
        self.prompt_tokens: dict[str, int] = {}
        self.choices: dict[int, _Choice] = {}
        # request id -> its prompt's text as sent (None: the text of the ids the engine read)
        self.echo = None if echo is None else dict(zip(request_ids, echo))
        self.echoed: dict[str, _Choice] = {}  # request id -> the start every choice of it gets
        self.prompt_logprobs = prompt_logprobs  # vLLM's field: its top k, None if not asked for
        self.prompt_entries: dict[str, list[Optional[dict[str, Any]]]] = {}  # request id -> that field

    def _index(self, request_id: str, completion_index: int) -> int:
        return self.prompt_index[request_id] * self.n + completion_index

    def add(self, out: Any) -> list[int]:
        """Fold a delta output in; the indices of the choices it brought something to."""
        self.prompt_tokens[out.request_id] = len(out.prompt_token_ids)
        self.prompt_ids[out.request_id] = out.prompt_token_ids
        if out.num_cached_tokens is not None:
            self.cached_tokens[out.request_id] = out.num_cached_tokens
        if self.prompt_logprobs is not None and out.prompt_logprobs is not None:  # the first output has them
            self.prompt_entries[out.request_id] = self._vllm_prompt_logprobs(out)
        if self.echo is not None and out.request_id not in self.echoed:  # its first output
            self.echoed[out.request_id] = self._echo_start(out)
        touched = []
        for c in out.outputs:
            i = self._index(out.request_id, c.index)
            if i not in self.choices:
                start = self.echoed.get(out.request_id)
                self.choices[i] = _Choice() if start is None else _Choice(
                    text=list(start.text), token_ids=list(start.token_ids), echoed=start.echoed,
                    logprobs=None if start.logprobs is None else list(start.logprobs))
            ch = self.choices[i]
            ch.finish_reason, ch.stop_reason = c.finish_reason, c.stop_reason
            touched.append(i)
            if not self.generates:
                continue
            ch.text.append(c.text)
            ch.token_ids.extend(c.token_ids)
            if c.logprobs is not None:
                if ch.logprobs is None:
                    ch.logprobs = []
                ch.logprobs.extend(c.logprobs)
        return touched

    def _echo_start(self, out: Any) -> _Choice:
        """What echo puts first in each choice: the prompt's text, its tokens, and with logprobs their
        entries (the engine's prompt_logprobs)."""
        prompt = self.echo[out.request_id]
        text = prompt if prompt is not None else self.tokenizer.decode(out.prompt_token_ids)
        ids = list(out.prompt_token_ids)
        entries = None if self.logprobs is None else list(out.prompt_logprobs or [None] * len(ids))
        return _Choice(text=[text], token_ids=ids, logprobs=entries, echoed=len(ids))

    def finish_reasons(self) -> list[Optional[str]]:
        return [ch.finish_reason for ch in self.choices.values()]

    def usage(self) -> dict[str, Any]:
        prompt = sum(self.prompt_tokens.values())
        completion = sum(len(ch.token_ids) - ch.echoed for ch in self.choices.values())
        usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion}
        if self.prompt_details:
            usage["prompt_tokens_details"] = {"cached_tokens": sum(self.cached_tokens.values())}
        return usage

    # ---- logprobs ----
    def _token(self, token_id: int) -> str:
        """The token's text; with return_tokens_as_token_ids, or without a tokenizer (load_format='dummy'),
        vLLM's ``token_id:<id>`` spelling."""
        if self.token_ids_as_text or self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def _bytes(self, token_id: int, text: str) -> list[int]:
        """The token's own bytes (token_bytes), so a character split across tokens joins back; those of its
        ``token_id:<id>`` spelling where it is given so (as vLLM)."""
        if self.token_ids_as_text or self.tokenizer is None:
            return list(text.encode())
        return token_bytes(self.tokenizer, token_id)

    def _logprobs(self, token_ids: list[int], entries: list[Optional[dict[int, float]]] | None,
                  text_offset: int) -> dict[str, Any] | None:
        if self.logprobs is None or entries is None:
            return None
        k = self.logprobs
        tops = [None if e is None else sorted(e.items(), key=lambda kv: -kv[1])[:k] for e in entries]
        if self.kind == "chat":
            content = []
            for tid, entry, top in zip(token_ids, entries, tops):
                tok = self._token(tid)
                content.append({"token": tok, "logprob": _finite(entry[tid]), "bytes": self._bytes(tid, tok),
                                "top_logprobs": [{"token": self._token(t), "logprob": _finite(lp),
                                                  "bytes": self._bytes(t, self._token(t))}
                                                 for t, lp in top]})
            return {"content": content}
        tokens = [self._token(t) for t in token_ids]
        offsets = []
        for tok in tokens:
            offsets.append(text_offset)
            text_offset += len(tok)
        # as OpenAI's legacy API and vLLM: a position's top_logprobs hold its own token first, then the top
        # k (up to k + 1 entries; a token among the top k is not repeated)
        return {"tokens": tokens,
                "token_logprobs": [None if e is None else _finite(e[t]) for t, e in zip(token_ids, entries)],
                "top_logprobs": [None if top is None else
                                 {self._token(t): _finite(lp) for t, lp in [(tid, e[tid])] + top}
                                 for tid, e, top in zip(token_ids, entries, tops)],
                "text_offset": offsets}

    def _vllm_prompt_logprobs(self, out: Any) -> list[Optional[dict[str, Any]]]:
        """vLLM's prompt_logprobs: the prompt token's entry with its rank, then the top k ranked 1 to k (the
        token among them takes its place there, as in vLLM)."""
        k, entries = self.prompt_logprobs, []
        for tid, entry, rank in zip(out.prompt_token_ids, out.prompt_logprobs, out.prompt_logprob_ranks):
            if entry is None:
                entries.append(None)
                continue
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
            ranked = [(tid, entry[tid], rank)] + [(t, lp, j + 1) for j, (t, lp) in enumerate(top)]
            entries.append({str(t): {"logprob": _finite(lp), "rank": r,
                                     "decoded_token": None if self.tokenizer is None else self._token(t)}
                            for t, lp, r in ranked})
        return entries

    # ---- whole responses ----
    def body(self) -> dict[str, Any]:
        choices = []
        for i, ch in sorted(self.choices.items()):
            text = "".join(ch.text)
            choice: dict[str, Any] = {"index": i, "logprobs": self._logprobs(ch.token_ids, ch.logprobs, 0),
                                      "finish_reason": ch.finish_reason, "stop_reason": ch.stop_reason}
            if self.kind == "chat":
                ch.parts = ChatParts(self.reasoning, self.tools)
                choice["message"] = ch.parts.message(text)
                choice["finish_reason"] = ch.parts.finish_reason(ch.finish_reason)
            else:
                choice["text"] = text
                if self.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = self.prompt_entries.get(self.request_ids[i // self.n])
                if self.return_token_ids:
                    choice["prompt_token_ids"] = list(self.prompt_ids[self.request_ids[i // self.n]])
            if self.return_token_ids:
                choice["token_ids"] = ch.token_ids[ch.echoed:]
            choices.append(choice)
        body = {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}
        if self.kind == "chat" and self.prompt_logprobs is not None:
            body["prompt_logprobs"] = next(iter(self.prompt_entries.values()), None)
        if self.kind == "chat" and self.return_token_ids:
            body["prompt_token_ids"] = list(next(iter(self.prompt_ids.values()), []))
        return body

    def _delta(self, ch: _Choice, text: str) -> dict[str, Any]:
        if ch.parts is None:
            ch.parts = ChatParts(self.reasoning, self.tools)
        return ch.parts.delta(text, final=ch.finish_reason is not None)

    # ---- streams ----
    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def role_chunk(self, first: Any) -> dict[str, Any]:
        """Chat streams open every choice with the assistant role, as OpenAI does (``first``: the request's
        first output, whose prompt ids return_token_ids sends here)."""
        total = len(self.prompt_index) * self.n
        chunk = self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None} for i in range(total)])
        if self.return_token_ids:
            chunk["prompt_token_ids"] = list(first.prompt_token_ids)
        return chunk

    def chunks(self, out: Any) -> list[dict[str, Any]]:
        """Fold ``out`` in; the chunks that send each of its choices' new text."""
        chunks = []
        for i in self.add(out):
            ch = self.choices[i]
            if ch.done:
                continue
            text = "".join(ch.text[ch.sent_parts:])
            ch.sent_parts = len(ch.text)
            delta = self._delta(ch, text) if self.kind == "chat" else text
            if not delta and ch.finish_reason is None:
                continue  # its tokens' logprobs ride on the next chunk with text
            new_lp = None if ch.logprobs is None else ch.logprobs[ch.sent_tokens:]
            lp = self._logprobs(ch.token_ids[ch.sent_tokens:], new_lp, ch.sent_offset)
            finish = ch.finish_reason if ch.parts is None else ch.parts.finish_reason(ch.finish_reason)
            choice: dict[str, Any] = {"index": i, "logprobs": lp, "finish_reason": finish,
                                      "stop_reason": ch.stop_reason}
            choice["delta" if self.kind == "chat" else "text"] = delta
            if self.return_token_ids:
                if self.kind == "completion" and ch.sent_tokens == 0:  # the choice's first chunk
                    choice["prompt_token_ids"] = list(self.prompt_ids[self.request_ids[i // self.n]])
                choice["token_ids"] = ch.token_ids[max(ch.sent_tokens, ch.echoed):]
            chunks.append(self._chunk([choice]))
            ch.sent_tokens = len(ch.token_ids)
            if lp is not None and "tokens" in lp:  # a token's text may ride a later chunk than the token
                ch.sent_offset += sum(map(len, lp["tokens"]))
            ch.done = ch.finish_reason is not None
        return chunks

    def usage_chunk(self) -> dict[str, Any]:
        chunk = self._chunk([])
        chunk["usage"] = self.usage()
        return chunk
