"""Sequences and requests.

A request (SequenceGroup) starts as one sequence. Its prompt is prefilled once, in chunks over several
steps when it exceeds the step's token budget; the first sampling step draws its n first tokens from that
one row and forks the sequence into n, which share the prompt's blocks (copy-on-write). From then on
each sequence is scheduled, preempted and finished on its own; samples forked beyond the free slots
wait for one like preempted sequences (scheduler.py).

Invariants: ``num_computed_tokens`` tokens have their K/V in the cache at ``block_table``; a running
sequence with more than one uncomputed token is being prefilled in chunks (it already holds blocks for
all its tokens); one with exactly one uncomputed token decodes it (the last sampled one, or the last
prompt token when a chunk stopped one short). A token is sampled only by the step that computes the
sequence's last token.

Scheduling ahead (LLMEngine, async_scheduling): once a step is launched, each of its sequences that
draws one token of its own (a decode, or a first draw of n = 1) counts the tokens the step computes as
computed, and appends a ``PENDING`` placeholder for the token it samples, so the next step (a decode,
or a prefill admitting waiting requests with it riding along) can be scheduled and launched before
that id reaches the host (the device feeds it in). Placeholders are always the last ``num_pending``
entries of ``token_ids``; the ids before them are real. Lengths, offsets and slots count them; text,
stop checks, outputs and block hashes use only real ids.
"""
from __future__ import annotations

import enum
import hashlib
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Union

from rast_engine.detokenizer import IncrementalDetokenizer
from rast_engine.outputs import CompletionOutput, RequestOutput
from rast_engine.logit_adjust import OutputCounts, RequestTensors
from rast_engine.structured import RequestGrammar, SequenceMatcher
from rast_engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from rast_engine.lora_registry import PendingLora

_seq_ids = itertools.count()
PENDING = -1  # a token sampled on the device whose id the host has not read yet


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: sequences are compared and removed by object
class Sequence:
    group: "SequenceGroup"
    index: int  # sample index within the request
    token_ids: list[int]
    seed: int
    detok: Optional[IncrementalDetokenizer] = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of the full computed blocks
    num_computed_tokens: int = 0
    num_scheduled_tokens: int = 0  # uncomputed tokens the step being run computes (set by the scheduler)
    output_text: str = ""
    logprobs: Optional[list[dict[int, float]]] = None
    cumulative_logprob: float = 0.0
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None  # CompletionOutput.stop_reason
    num_pending: int = 0  # trailing PENDING placeholders in token_ids
    # what this sequence's delta outputs have reported so far (SamplingParams.output_kind == "delta")
    reported_tokens: int = 0
    reported_chars: int = 0
    reported_finish: bool = False
    output_counts: Optional[OutputCounts] = None  # kept for penalized requests only (logit_adjust.py)
    matcher: Optional[SequenceMatcher] = None  # kept for structured outputs only (structured.py)

    @property
    def params(self) -> SamplingParams:
        return self.group.params

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.group.prompt_token_ids)

    @property
    def num_generated(self) -> int:
        """Tokens generated so far, pending ones included (the sampler's offset of the next draw)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_known(self) -> int:
        """Tokens whose ids the host has: all but the pending ones."""
        return len(self.token_ids) - self.num_pending

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprobs: Optional[dict[int, float]]) -> None:
        self.token_ids.append(token_id)
        self._add_logprobs(token_id, logprobs)

    def _add_logprobs(self, token_id: int, logprobs: Optional[dict[int, float]]) -> None:
        if logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token_id]

    def add_pending(self) -> None:
        """The launched decode step computes the last token and samples the next one on the device."""
        self.num_computed_tokens += self.num_scheduled_tokens
        self.token_ids.append(PENDING)
        self.num_pending += 1

    def resolve_pending(self, token_id: int, logprobs: Optional[dict[int, float]]) -> None:
        """The oldest pending token's id (and logprobs) has arrived."""
        if not self.num_pending:
            raise RuntimeError(f"sequence {self.seq_id} has no pending token to resolve")
        self.token_ids[self.num_known] = token_id
        self.num_pending -= 1
        self._add_logprobs(token_id, logprobs)

    def drop_pending(self) -> None:
        """Forget the tokens still on their way: the sequence finished, or is recomputed from its ids."""
        if self.num_pending:
            del self.token_ids[-self.num_pending:]
            self.num_pending = 0

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: drop the cache state, keep every known token and the output so far."""
        self.drop_pending()
        self.status = SequenceStatus.WAITING
        self.block_table = []
        self.block_hashes = []
        self.num_computed_tokens = 0
        self.num_scheduled_tokens = 0

    def _shown_chars(self, holdback: int) -> int:
        """How much of the text an output may show: a stop string may still complete over the last
        ``holdback`` characters of an unfinished sequence. It never shrinks: a stop string found later
        ends after the characters already shown, so trimming at it keeps them."""
        text_len = len(self.output_text)
        return text_len if self.finished else max(text_len - holdback, 0)

    def _completion(self, chars: int, tokens: int, shown: int) -> CompletionOutput:
        """The output from character ``chars`` and generated token ``tokens`` on, its text up to ``shown``."""
        want_logprobs = self.params.logprobs is not None
        return CompletionOutput(
            index=self.index, text=self.output_text[chars:shown],
            token_ids=self.token_ids[self.num_prompt_tokens + tokens:self.num_known], finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            cumulative_logprob=self.cumulative_logprob if want_logprobs else None,
            logprobs=self.logprobs[tokens:] if want_logprobs and self.logprobs is not None else None,
        )

    def completion(self, holdback: int) -> CompletionOutput:
        return self._completion(0, 0, self._shown_chars(holdback))

    def delta_completion(self, holdback: int) -> Optional[CompletionOutput]:
        """What the last delta output did not report: new text, token ids and logprobs, and the finish
        reason once (None: nothing new). Each call costs O(new tokens), never O(all tokens)."""
        shown = max(self._shown_chars(holdback), self.reported_chars)
        generated = self.num_known - self.num_prompt_tokens
        if shown == self.reported_chars and generated == self.reported_tokens and self.reported_finish == self.finished:
            return None
        out = self._completion(self.reported_chars, self.reported_tokens, shown)
        self.reported_chars, self.reported_tokens, self.reported_finish = shown, generated, self.finished
        return out


@dataclass(eq=False)
class SequenceGroup:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    request_seed: int
    arrival: int
    weights: list[float]  # λ per small pair for this request
    priority: int = 0  # vLLM's: with scheduling_policy="priority", lower values are scheduled first
    # its RL model's LoRA adapter among the engine's lora_modules (engine/lora_modules.py), -1: none; its
    # load roots the prefix cache's block hashes, since R's keys and values depend on it
    lora_slot: int = -1
    cache_root: bytes = b""
    weights_root: bytes = b""  # the weights loaded when it was added (weight_updates.py): roots its hashes too
    cache_salt: Optional[str] = None  # vLLM's: its blocks are shared only with requests of the same salt
    # the adapter load it waits for, no slot being free when it was added or its adapter evicted before it
    # was admitted (lora_slot -1 and no root until then): it is neither admitted nor hashed before the
    # scheduler loads it (engine/lora_registry.py)
    lora_pending: Optional[PendingLora] = None
    # a sequence of it was admitted: from then on its LoRA slot is held (never evicted) until it ends; before,
    # an eviction sends it back to waiting for its adapter's reload, so queued requests keep no slot from
    # the loads queued before them (vLLM counts only scheduled requests' adapters)
    admitted: bool = False
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False
    prompt_counted: bool = False  # its prompt is in the engine's prompt-token count: once, at its first token
    grammar: Optional[RequestGrammar] = None  # structured outputs' compiled constraint (structured.py)
    # SamplingParams.prompt_logprobs: filled in prompt order by the prefill (prompt_logprobs.py)
    prompt_logprobs: Optional[list[Optional[dict[int, float]]]] = None
    prompt_logprob_ranks: Optional[list[Optional[int]]] = None  # beside prompt_logprobs: each token's rank
    # vLLM's RequestOutput.num_cached_tokens: the prompt tokens its first admission found in the prefix cache
    # (block_manager.allocate); a later recompute after preemption does not change it
    num_cached_tokens: Optional[int] = None
    _prompt_logprobs_reported: bool = field(default=False, init=False, repr=False)
    adjust_tensors: Optional[RequestTensors] = field(default=None, init=False, repr=False)  # adjusted requests
    _prompt_out: Optional[list[int]] = field(default=None, init=False, repr=False)  # see output()

    @property
    def hash_root(self) -> bytes:
        """What the prefix cache's block hashes of this request start from: the weights loaded, its adapter
        load's root, and its cache_salt where it has one (one salt, one cache; no salt, the shared one)."""
        root = self.weights_root + self.cache_root
        if self.cache_salt is None:
            return root
        return root + b"\0salt:" + hashlib.blake2b(self.cache_salt.encode(), digest_size=16).digest()

    @property
    def finished(self) -> bool:
        return self.forked and all(s.finished for s in self.seqs)

    def output(self) -> Optional[RequestOutput]:
        """The request's output of its kind (SamplingParams.output_kind); None for a delta output
        with nothing new. Every output of a request shares one copy of the prompt ids (a copy per
        output would cost O(prompt) a step); the engine's own list is never handed out."""
        holdback = max((len(s) for s in self.params.stop_list), default=1) - 1
        seqs = sorted(self.seqs, key=lambda s: s.index)
        if self.params.output_kind == "delta":
            completions = [c for c in (s.delta_completion(holdback) for s in seqs) if c is not None]
            if not completions:
                return None
        else:
            completions = [s.completion(holdback) for s in seqs]
        if self._prompt_out is None:
            self._prompt_out = list(self.prompt_token_ids)
        prompt_logprobs, ranks = self.prompt_logprobs, self.prompt_logprob_ranks
        if self.params.output_kind == "delta":
            if self._prompt_logprobs_reported:
                prompt_logprobs = ranks = None
            self._prompt_logprobs_reported = True
        return RequestOutput(request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self._prompt_out,
                             outputs=completions, finished=self.finished, prompt_logprobs=prompt_logprobs,
                             prompt_logprob_ranks=ranks, num_cached_tokens=self.num_cached_tokens)
