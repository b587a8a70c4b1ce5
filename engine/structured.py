"""Structured outputs (vLLM's `structured_outputs`, OpenAI's `response_format`): the output is held to a
JSON schema, any JSON object, a regular expression, a choice of strings or an EBNF grammar by masking,
at every draw, the tokens that cannot continue it. The grammar engine is xgrammar (the `structured`
extra), imported only when a request asks for it.

How: a request's constraint is compiled once at intake (xgrammar's compiler caches compiled grammars);
each sequence keeps its own matcher, brought up to date with the output tokens added since its last draw
(as logit_adjust.OutputCounts does), and its next-token bitmask masks z with the other adjustments. The
bitmask is computed when the sampler's inputs are built, after the step's forwards are enqueued, so on
CUDA the matcher's host work (about 0.5 ms a row at V = 152064 on this 2-core Xeon, bench/logit_adjust.py)
overlaps the forwards, as vLLM overlaps it; a step's rows are filled together on up to MAX_FILL_THREADS
of xgrammar's threads (BatchGrammarMatcher), which run outside the GIL. A draw reads every earlier token of its sequence: such steps
are never launched ahead (SamplingParams.reads_output). Once the grammar is complete only the stop tokens
(the engine's EOS ids) remain; a completed grammar with ignore_eos keeps drawing them up to max_tokens.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rast_engine.errors import RastError
from rast_engine.structured_params import StructuredOutputsParams, kind
from rast_engine.structured_thinking import ThinkingMatcher, ThinkingTags

if TYPE_CHECKING:
    from rast_engine.sequence import Sequence


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise RastError("structured outputs need xgrammar: pip install xgrammar (or the 'structured' extra)",
                        param="structured_outputs") from None
    return xgrammar


class Grammars:
    """An engine's grammar compiler over its tokenizer, vocabulary width and stop tokens, and with a
    reasoning parser the thinking its constraints start after (structured_thinking); built at the first
    structured request."""

    def __init__(self, tokenizer: Any, vocab: int, stop_token_ids: list[int],
                 reasoning_parser: Any = None) -> None:
        if tokenizer is None:
            raise RastError("structured outputs need the model's tokenizer, and this engine has none",
                            param="structured_outputs")
        xgr = _xgrammar()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=stop_token_ids)
        self.xgr, self.vocab = xgr, vocab
        self.compiler = xgr.GrammarCompiler(info, cache_limit_bytes=GRAMMAR_CACHE_BYTES)
        self.batch = xgr.BatchGrammarMatcher(max_threads=min(MAX_FILL_THREADS, os.cpu_count() or 1))
        self.tokenizer = tokenizer
        self.thinking = None if reasoning_parser is None else ThinkingTags.of(reasoning_parser, tokenizer, vocab)

    def matcher(self, compiled: Any, prompt_ids: list[int]) -> Any:
        """A fresh matcher of ``compiled`` for an output after ``prompt_ids``."""
        inner = self.xgr.GrammarMatcher(compiled)
        if self.thinking is None:
            return inner
        blank = lambda t: not self.tokenizer.decode([t]).strip()  # noqa: E731
        return ThinkingMatcher(inner, self.thinking, self.thinking.first_phase(prompt_ids, blank))

    def compile(self, p: StructuredOutputsParams) -> Any:
        """The compiled grammar; RastError naming the constraint when xgrammar refuses it, or when no token
        of the vocabulary can begin it (json_object over a vocabulary without "{"), which would otherwise
        fail only at its first draw."""
        if self.thinking is not None:
            self.thinking.check()
        compiled = self._compile(p)
        start = self.xgr.allocate_token_bitmask(1, self.vocab)
        self.xgr.GrammarMatcher(compiled).fill_next_token_bitmask(start)
        if not bool(start.any()):
            raise RastError(f"structured_outputs.{kind(p)}: no token of this model's vocabulary can begin it",
                            param="structured_outputs")
        return compiled

    def _compile(self, p: StructuredOutputsParams) -> Any:
        try:
            if p.json is not None:
                schema = p.json if isinstance(p.json, str) else json.dumps(p.json)
                return self.compiler.compile_json_schema(schema)
            if p.json_object:  # OpenAI's json_object: an object, not any JSON value (as vLLM)
                return self.compiler.compile_json_schema('{"type": "object"}')
            if p.regex is not None:
                return self.compiler.compile_regex(p.regex)
            if p.choice is not None:  # EBNF string literals: JSON's escapes, characters kept as they are
                return self.compiler.compile_grammar("root ::= " + " | ".join(
                    json.dumps(c, ensure_ascii=False) for c in p.choice))
            return self.compiler.compile_grammar(p.grammar)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise RastError(f"structured_outputs.{kind(p)} cannot be compiled: {str(exc).strip()[:500]}",
                            param="structured_outputs") from None


_BUILDING = threading.Lock()
MAX_FILL_THREADS = 8  # xgrammar threads filling a step's bitmasks (the engine thread waits for them)
# compiled grammars kept for reuse (vLLM's default too): every distinct constraint a client sends is
# compiled once, and an evicted one is compiled again when it comes back
GRAMMAR_CACHE_BYTES = 512 * 2**20


def engine_grammars(engine: Any) -> Grammars:
    """The LLMEngine's Grammars, built by the first caller: the server builds them and compiles a request's
    constraint on a worker thread before admission, so the engine thread's compile is a cache hit and
    neither (a vocabulary's TokenizerInfo takes seconds) stalls the running batch."""
    with _BUILDING:
        if engine.grammars is None:
            engine.grammars = Grammars(engine.tokenizer, engine.vocab_size, sorted(engine.scheduler.stops.eos_token_ids),
                                       engine.config.reasoning_parser)
    return engine.grammars


@dataclass
class RequestGrammar:
    """A request's compiled constraint, and the engine's grammars it was compiled by."""
    grammars: Grammars
    compiled: Any


def _stop_only(vocab: int, stop_token_ids: list[int]) -> torch.Tensor:
    """int32 [ceil(vocab / 32)] with only the stop tokens' bits set."""
    words = (vocab + 31) // 32
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[[t for t in stop_token_ids if t < vocab]] = 1
    packed = (bits.view(words, 32) << torch.arange(32)).sum(1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


class SequenceMatcher:
    """A sequence's grammar matcher, fed the output tokens added since its last call; if tokens were
    dropped since (they never are once drawn), it starts again from the output's start."""

    def __init__(self, grammar: RequestGrammar, prompt_ids: list[int]) -> None:
        self.grammar = grammar
        self.matcher = grammar.grammars.matcher(grammar.compiled, prompt_ids)
        self.upto = -1  # index into token_ids up to which tokens are accepted (-1: none yet)

    def advance(self, token_ids: list[int], start: int) -> Any:
        """The matcher after token_ids[start:] (token_ids[:start]: the prompt)."""
        if self.upto < start or self.upto > len(token_ids):
            self.matcher, self.upto = self.grammar.grammars.matcher(self.grammar.compiled, token_ids[:start]), start
        for t in token_ids[self.upto:]:
            # a drawn token was allowed, so only a stop token past the grammar's end (ignore_eos) is refused
            if self.matcher.is_terminated() or not self.matcher.accept_token(t):
                break
        self.upto = len(token_ids)
        return self.matcher


def bitmasks(grammars: Grammars, matchers: list[Any]) -> torch.Tensor:
    """int32 [len(matchers), ceil(V / 32)] on the host: bit t of row i set iff matchers[i] takes token t
    next (once it has terminated, only the stop tokens: what a completed grammar with ignore_eos keeps
    drawing; inside a reasoning model's thinking, every token; before it is decided, the grammar's and
    <think>). The rows are filled together on xgrammar's threads, outside the GIL."""
    out = grammars.xgr.allocate_token_bitmask(len(matchers), grammars.vocab)
    phases = [getattr(m, "phase", "grammar") for m in matchers]
    free = [i for i, phase in enumerate(phases) if phase == "thinking"]
    out[free] = -1
    live = [i for i, m in enumerate(matchers) if phases[i] != "thinking" and not m.is_terminated()]
    if live:
        grammars.batch.batch_fill_next_token_bitmask([getattr(matchers[i], "inner", matchers[i]) for i in live],
                                                     out, indices=live)
    for i in (i for i, phase in enumerate(phases) if phase == "undecided"):
        word, bit = divmod(grammars.thinking.open_id, 32)
        out[i, word] |= (1 << bit) - (1 << 32 if bit == 31 else 0)
    for i in sorted(set(range(len(matchers))) - set(live) - set(free)):
        out[i] = _stop_only(grammars.vocab, list(matchers[i].stop_token_ids))
    return out


def draw_bitmasks(draws: list[tuple[Sequence, bool]]) -> torch.Tensor:
    """The bitmasks [len(draws), ceil(V / 32)] of (sequence, first draw) pairs of one engine, on the host."""
    return bitmasks(draws[0][0].group.grammar.grammars, [grammar_matcher(seq, first) for seq, first in draws])


def grammar_matcher(seq: Sequence, first_draw: bool) -> Any:
    """xgrammar's matcher of ``seq``'s draw, up to date with its output (a request's first draw: the
    grammar's start)."""
    grammar = seq.group.grammar
    if first_draw:
        return SequenceMatcher(grammar, seq.token_ids[:seq.num_prompt_tokens]).matcher
    if seq.num_pending:  # reads_output keeps such a draw from being launched ahead
        raise RuntimeError(f"sequence {seq.seq_id}: a structured output reads an output with pending tokens")
    if seq.matcher is None:
        seq.matcher = SequenceMatcher(grammar, seq.token_ids[:seq.num_prompt_tokens])
    return seq.matcher.advance(seq.token_ids, seq.num_prompt_tokens)


def unpack(bitmasks: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [N, vocab] from int32 bitmasks [N, ceil(vocab / 32)] (bit j of word i: token 32 i + j)."""
    shifts = torch.arange(32, device=bitmasks.device, dtype=torch.int32)
    bits = (bitmasks.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmasks.shape[0], -1)[:, :vocab].bool()
