"""Per-request sampling parameters (vLLM names). Validated on construction so a bad value fails at the
call site with a clear message, never inside a batched step."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from rast_engine.errors import RastError
from rast_engine.logits_processors import Processor, as_processors
from rast_engine.structured_params import StructuredOutputsParams

MASK64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15


def _splitmix64(x: int) -> int:
    x = (x + GOLDEN64) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def signed64(x: int) -> int:
    """An integer taken modulo 2**64, as the signed int64 the sampler takes."""
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def sample_seed(request_seed: int, index: int) -> int:
    """The seed of sample ``index`` of a request: a function of (request_seed, index) only, so a seeded
    request draws the same tokens in any batch; returned as a signed int64 for the sampler."""
    return signed64(_splitmix64((request_seed & MASK64) ^ _splitmix64(index)))


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


OUTPUT_KINDS = ("cumulative", "delta", "final_only")
# |λ| bound: λ·(R − S) must stay finite in float32 for any real logits (a larger λ turns every token's
# combined logit infinite, so no token can be drawn); useful values are O(1)
MAX_LAM = 1e6
# z / r must stay finite in float32 (|z| up to 1e36; 1e-39 turned the most favoured tokens infinite, which
# the sampler excludes: the penalty's effect reversed)
MIN_REPETITION = 0.01
MAX_BIAS = 100.0  # OpenAI's logit_bias range; a token is banned by -100 and all but forced by 100
MAX_BAD_WORDS = 128  # vLLM's bound; each is matched against the output's tail at every draw, on the host
# stop strings are searched in the new text and stop ids looked up at every token of the request, on the
# engine thread, so their numbers bound the work one request adds to every step it joins
MAX_STOP_STRINGS = 128
MAX_STOP_TOKEN_IDS = 1024
TOP_K_OFF_FROM = 1 << 31  # the kernels take int32; any k >= V is off, and every vocabulary is far smaller


def is_lam(x: object) -> bool:
    """A valid λ: a finite number of magnitude at most MAX_LAM."""
    return _is_number(x) and math.isfinite(x) and abs(x) <= MAX_LAM


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    max_tokens: Optional[int] = 16  # None: up to the end of the context (max_model_len), as vLLM
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    seed: Optional[int] = None
    # overrides the engine's λ for this request: a number (engines with one small pair) or one number per
    # pair, in the engine's pair order (the main pair first, then `experts`)
    lam: Optional[Union[float, list[float]]] = None
    logprobs: Optional[int] = None  # None: none; k >= 0: the chosen token's logprob plus the top k
    # None: none; k >= 0: each prompt token's logprob (after the first) under the combined distribution,
    # raw (no temperature or filters), plus the top k there (vLLM's; engine/prompt_logprobs.py)
    prompt_logprobs: Optional[int] = None
    include_stop_str_in_output: bool = False  # keep the matched stop string, or the stop token's text, at the end
    skip_special_tokens: bool = True  # leave special tokens (EOS, chat markers) out of the text
    # "cumulative": the request's RequestOutput, everything so far, at every step it progresses;
    # "delta": at every such step only what is new (text, token ids, logprobs; a completion appears when
    # it has something new or has just finished), as vLLM's RequestOutputKind.DELTA;
    # "final_only": one output, when the request finishes. A cumulative output copies every token so
    # far, O(tokens) of host time a step at long outputs (reasoning traces of thousands of tokens), so
    # streaming consumers (the server, rast generate) ask for "delta", and LLM.generate and rast eval,
    # which read final outputs only, for "final_only"
    output_kind: str = "cumulative"
    # Adjustments of the combined logits z = M + Σ λ·(R − S) before temperature and filters, in this
    # order (engine/logit_adjust.py): tokens outside allowed_token_ids masked (vLLM's); the last token of
    # a bad word masked wherever the output ends with the rest of it (vLLM's: each word tokenised as is
    # and with a leading space, by the engine at intake); z + logit_bias[t] (OpenAI's; ids < the
    # vocabulary, |bias| <= 100); EOS and stop_token_ids masked until the output holds min_tokens tokens
    # (stop strings are not matched until then either, as vLLM); vLLM's penalties: z / r (z > 0) or
    # z · r (z <= 0) for tokens of the prompt or the output, then z − frequency · count − presence ·
    # [count > 0] for output tokens
    logit_bias: Optional[dict[int, float]] = None
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    # the output held to a JSON schema, any JSON object, a regex, a choice or a grammar (vLLM's; a dict is
    # taken as StructuredOutputsParams' fields): tokens that cannot continue it are masked (structured.py)
    structured_outputs: Optional[StructuredOutputsParams] = None
    min_tokens: int = 0
    # keep only the prompt's last k tokens (vLLM's; k >= 1, or -1: as many as the context leaves room for)
    truncate_prompt_tokens: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # contrastive decoding's plausibility constraint: mask every token to which the large model alone gives
    # less than this fraction of its top token's probability (0: off; engine/plausibility.py)
    plausibility_alpha: float = 0.0
    # vLLM V0's: callables fn(output_ids, logits) or fn(prompt_ids, output_ids, logits) -> logits over z,
    # after logit_bias and min_tokens' bans, before the penalties; one with a ``parts`` keyword also gets
    # the models' own logits (engine/logits_processors.py); the server loads them by name
    logits_processors: Optional[list[Callable[..., Any]]] = None
    stop_list: list[str] = field(init=False, repr=False)
    processors: Optional[list[Processor]] = field(init=False, repr=False, compare=False)  # logits_processors, checked
    # derived once here (read for every sequence at every step): any penalty is on, so the draws depend on
    # the tokens so far; any adjustment of z is on (any of the fields above: logit_adjust.py)
    penalized: bool = field(init=False, repr=False, compare=False)
    adjusts_logits: bool = field(init=False, repr=False, compare=False)
    # set by the engine at intake (set_bad_words_token_ids): the token sequences bad_words masks
    bad_words_token_ids: Optional[list[list[int]]] = field(default=None, init=False, repr=False, compare=False)
    # whether a draw reads every output token on the host (structured outputs' matcher), so its step is
    # never launched ahead; penalties and bad words read a pending token on the device (logit_adjust.py)
    reads_output: bool = field(init=False, repr=False, compare=False)
    masks_tokens: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def bad(param: str, msg: str) -> RastError:
            return RastError(f"SamplingParams: {msg}", param=param)

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", f"n must be an integer >= 1, got {self.n!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature",
                      f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", f"top_k must be an integer >= 0 (0 or -1 disables it), got {self.top_k!r}")
        if self.top_k == -1 or self.top_k >= TOP_K_OFF_FROM:
            self.top_k = 0
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", f"max_tokens must be an integer >= 1, or None (up to the end of the context), "
                                    f"got {self.max_tokens!r}")
        stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if len(stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"stop holds {len(stop)} strings; at most {MAX_STOP_STRINGS}")
        self.stop_list = list(stop)
        ids = [] if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
            raise bad("stop_token_ids",
                      f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise bad("stop_token_ids", f"stop_token_ids holds {len(ids)} ids; at most {MAX_STOP_TOKEN_IDS}")
        self.stop_token_ids = list(ids)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", f"seed must be an integer or None, got {self.seed!r}")
        lam_ok = all(map(is_lam, self.lam)) if isinstance(self.lam, (list, tuple)) and self.lam else is_lam(self.lam)
        if self.lam is not None and not lam_ok:
            raise bad("lam", f"lam must be a number with |lam| <= {MAX_LAM:g}, a non-empty list of them (one per small "
                      f"pair) or None, got {self.lam!r}")
        if isinstance(self.lam, (list, tuple)):
            self.lam = [float(x) for x in self.lam]
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise bad(name, f"{name} must be an integer >= 0 or None, got {value!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise bad(name, f"{name} must be in [-2, 2] (0 is off), got {value!r}")
        if not _is_number(self.repetition_penalty) or not MIN_REPETITION <= self.repetition_penalty <= 100.0:
            raise bad("repetition_penalty", f"repetition_penalty must be in [{MIN_REPETITION}, 100] (1 is off), "
                      f"got {self.repetition_penalty!r}")
        bias = {} if self.logit_bias is None else self.logit_bias
        if not isinstance(bias, dict) or not all(_is_int(t) and t >= 0 and _is_number(b) and -MAX_BIAS <= b <= MAX_BIAS
                                                 for t, b in bias.items()):
            raise bad("logit_bias", "logit_bias must map token ids (integers >= 0) to numbers in "
                                    f"[-{MAX_BIAS:g}, {MAX_BIAS:g}], got {self.logit_bias!r}")
        self.logit_bias = {t: float(b) for t, b in bias.items() if b != 0} or None
        if self.allowed_token_ids is not None:
            allowed = self.allowed_token_ids
            if not isinstance(allowed, (list, tuple)) or not allowed or not all(_is_int(t) and t >= 0 for t in allowed):
                raise bad("allowed_token_ids", "allowed_token_ids must be a non-empty list of token ids "
                                               f"(integers >= 0) or None, got {self.allowed_token_ids!r}")
            self.allowed_token_ids = list(dict.fromkeys(allowed))
        if self.bad_words is not None:
            words = self.bad_words
            if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in words):
                raise bad("bad_words",
                          f"bad_words must be a list of strings with non-space characters, got {self.bad_words!r}")
            if len(words) > MAX_BAD_WORDS:
                raise bad("bad_words", f"bad_words holds {len(words)} words; at most {MAX_BAD_WORDS}")
            self.bad_words = list(words) or None
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as exc:
                raise bad("structured_outputs", f"structured_outputs: {exc}") from None
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise bad("structured_outputs", "structured_outputs must be a StructuredOutputsParams or a dict of "
                                            f"its fields, got {self.structured_outputs!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0 or (
                self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise bad("min_tokens",
                      f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        k = self.truncate_prompt_tokens
        if k is not None and (not _is_int(k) or not (k >= 1 or k == -1)):
            raise bad("truncate_prompt_tokens", "truncate_prompt_tokens must be an integer >= 1, -1 (the "
                                                f"context's room) or None, got {k!r}")
        if not _is_number(self.plausibility_alpha) or not 0.0 <= self.plausibility_alpha <= 1.0:
            raise bad("plausibility_alpha", f"plausibility_alpha must be in [0, 1] (0 is off), got {self.plausibility_alpha!r}")
        if self.output_kind not in OUTPUT_KINDS:
            raise bad("output_kind", f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        self.processors = as_processors(self.logits_processors)
        self.penalized = self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
        self.adjusts_logits = (self.logit_bias is not None or self.allowed_token_ids is not None
                               or self.bad_words is not None or self.structured_outputs is not None
                               or self.min_tokens > 0 or self.penalized or self.plausibility_alpha > 0
                               or self.processors is not None)
        # the grammar matcher and logits processors read each token on the host
        self.reads_output = self.structured_outputs is not None or self.processors is not None
        # a draw of this request may find every token masked by the request itself (NoAdmissibleToken
        # is then the request's fault, not the models')
        self.masks_tokens = (self.allowed_token_ids is not None or self.bad_words is not None
                             or self.structured_outputs is not None
                             or self.min_tokens > 0)  # EOS is masked then, ignore_eos or not

    def set_bad_words_token_ids(self, words: list[list[int]]) -> None:
        """bad_words as token sequences (the engine's tokenizer's, bad_words.tokenize_bad_words)."""
        self.bad_words_token_ids = words
