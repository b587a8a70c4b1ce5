"""OpenAI response bodies and stream chunks from the engine's cumulative RequestOutputs.

The engine's text only ever grows (it holds back a possible stop-string prefix and incomplete UTF-8),
so a stream chunk is the suffix beyond what this choice has already sent."""
from __future__ import annotations

import time
from typing import Any, Literal

Kind = Literal["completion", "chat"]


class Formatter:
    def __init__(self, kind: Kind, response_id: str, model: str, request_ids: list[str], n: int,
                 tokenizer: Any, logprobs: int | None) -> None:
        self.kind, self.id, self.model, self.n = kind, response_id, model, n
        self.created = int(time.time())
        self.prompt_index = {rid: i for i, rid in enumerate(request_ids)}
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.latest: dict[str, Any] = {}
        self._sent_chars: dict[int, int] = {}
        self._sent_tokens: dict[int, int] = {}
        self._done: set[int] = set()

    def _index(self, request_id: str, completion_index: int) -> int:
        return self.prompt_index[request_id] * self.n + completion_index

    def usage(self) -> dict[str, int]:
        prompt = sum(len(o.prompt_token_ids) for o in self.latest.values())
        completion = sum(len(c.token_ids) for o in self.latest.values() for c in o.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    # ---- logprobs ----
    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _logprobs(self, token_ids: list[int], entries: list[dict[int, float]] | None,
                  text_offset: int) -> dict[str, Any] | None:
        if self.logprobs is None or entries is None:
            return None
        k = self.logprobs
        tops = [sorted(e.items(), key=lambda kv: -kv[1])[:k] for e in entries]
        if self.kind == "chat":
            content = []
            for tid, entry, top in zip(token_ids, entries, tops):
                tok = self._token(tid)
                content.append({"token": tok, "logprob": entry[tid], "bytes": list(tok.encode()),
                                "top_logprobs": [{"token": self._token(t), "logprob": lp,
                                                  "bytes": list(self._token(t).encode())}
                                                 for t, lp in top]})
            return {"content": content}
        tokens = [self._token(t) for t in token_ids]
        offsets = []
        for tok in tokens:
            offsets.append(text_offset)
            text_offset += len(tok)
        return {"tokens": tokens, "token_logprobs": [e[t] for t, e in zip(token_ids, entries)],
                "top_logprobs": [{self._token(t): lp for t, lp in top} for top in tops],
                "text_offset": offsets}

    # ---- whole responses ----
    def body(self) -> dict[str, Any]:
        choices = []
        for rid, out in self.latest.items():
            for c in out.outputs:
                lp = self._logprobs(c.token_ids, c.logprobs, 0)
                choice: dict[str, Any] = {"index": self._index(rid, c.index), "logprobs": lp,
                                          "finish_reason": c.finish_reason}
                if self.kind == "chat":
                    choice["message"] = {"role": "assistant", "content": c.text}
                else:
                    choice["text"] = c.text
                choices.append(choice)
        choices.sort(key=lambda ch: ch["index"])
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    # ---- streams ----
    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def role_chunk(self) -> dict[str, Any]:
        """Chat streams open every choice with the assistant role, as OpenAI does."""
        total = len(self.prompt_index) * self.n
        return self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None} for i in range(total)])

    def chunks(self, out: Any) -> list[dict[str, Any]]:
        """The chunks that bring each choice of `out` from what was sent up to `out`."""
        self.latest[out.request_id] = out
        chunks = []
        for c in out.outputs:
            i = self._index(out.request_id, c.index)
            if i in self._done:
                continue
            chars, toks = self._sent_chars.get(i, 0), self._sent_tokens.get(i, 0)
            delta = c.text[chars:]
            if not delta and c.finish_reason is None:
                continue
            new_lp = None if c.logprobs is None else c.logprobs[toks:]
            lp = self._logprobs(c.token_ids[toks:], new_lp, chars)
            choice: dict[str, Any] = {"index": i, "logprobs": lp, "finish_reason": c.finish_reason}
            if self.kind == "chat":
                choice["delta"] = {"content": delta} if delta else {}
            else:
                choice["text"] = delta
            chunks.append(self._chunk([choice]))
            self._sent_chars[i], self._sent_tokens[i] = len(c.text), len(c.token_ids)
            if c.finish_reason is not None:
                self._done.add(i)
        return chunks

    def usage_chunk(self) -> dict[str, Any]:
        chunk = self._chunk([])
        chunk["usage"] = self.usage()
        return chunk
