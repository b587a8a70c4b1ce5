"""Beam search over RAST's combined distribution: vLLM's ``LLM.beam_search`` (BeamSearchParams,
BeamSearchOutput), with λ per search.

Each step asks the engine for one token of every live beam with logprobs, so it is driven through
``LLM.generate`` and its prefix cache: a beam's prompt is its parent's plus one token, so only the tokens
after its last full cached block are computed again.

Per prompt and step, as vLLM's: every live beam offers its 2·beam_width most likely next tokens (log
probabilities of softmax(z / T), z the combined logits; T = 1 for temperature 0; ties to the lower id) and
the token the step drew, which at temperature > 0 may lie outside them (vLLM's candidates are its logprobs
entry, which holds the drawn token beside the top ones); a candidate ending in an EOS id (unless
ignore_eos) is complete, and the beam_width best of the others by cumulative log probability live on. A
beam that fills the context is complete too. At the end the complete and live beams are ranked by vLLM's
score, cum_logprob / len(tokens) ** length_penalty with len counting the prompt's tokens and not a final
EOS, and the best beam_width are returned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from rast_engine.errors import RastError
from rast_engine.outputs import RequestOutput
from rast_engine.sampling_params import SamplingParams


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    lam: Optional[Union[float, list[float]]] = None  # rast's: λ for this search (None: the engine's)
    # rast's: each step's logprobs entry keeps at least this many top tokens (the server's logprobs field);
    # the candidates stay the top 2·beam_width and the drawn token
    logprobs: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RastError(f"{name} must be an integer >= 1, got {value!r}", param=name)
        if not isinstance(self.length_penalty, (int, float)) or self.length_penalty != self.length_penalty:
            raise RastError(f"length_penalty must be a number, got {self.length_penalty!r}", param="length_penalty")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or self.logprobs < 0):
            raise RastError(f"logprobs must be None or an integer >= 0, got {self.logprobs!r}", param="logprobs")
        self.step_params()  # temperature and lam, checked as SamplingParams checks them

    def step_params(self) -> SamplingParams:
        """One step of every live beam: one token, with the logprobs of its 2·beam_width best (or more)."""
        return SamplingParams(temperature=self.temperature, max_tokens=1, logprobs=max(2 * self.beam_width,
                              self.logprobs or 0), lam=self.lam, ignore_eos=True)


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # the prompt's ids, then the beam's
    # per generated token: its step's entry (the top 2·width or more, and the drawn token)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: Optional[str] = None  # the tokens' text, prompt included (as vLLM's); None without a tokenizer
    finish_reason: Optional[str] = None  # "stop" (an EOS), "length" (max_tokens or the context)


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


def beam_score(beam: BeamSearchSequence, eos_ids: frozenset[int], length_penalty: float) -> float:
    length = len(beam.tokens) - (1 if beam.finish_reason == "stop" and beam.tokens[-1] in eos_ids else 0)
    return beam.cum_logprob / length ** length_penalty


@dataclass
class _Search:
    prompt: list[int]
    live: list[BeamSearchSequence]
    done: list[BeamSearchSequence] = field(default_factory=list)
    children: list[BeamSearchSequence] = field(default_factory=list)


class BeamSearch:
    """One search over a batch of prompts, driven by whoever runs the engine (LLM.beam_search here, the
    server's event loop there): ``prompts()`` are the next step's (every live beam's tokens; the prompts as
    given first), ``take(outputs)`` folds that step's RequestOutputs in, in the same order, until
    ``prompts()`` is empty; then ``results()``."""

    def __init__(self, prompts: Sequence, params: BeamSearchParams, eos_ids: frozenset[int],
                 max_model_len: int) -> None:
        self.params, self.eos_ids, self.max_model_len = params, eos_ids, max_model_len
        self.first: Optional[list] = list(prompts)  # the first step reads them as ids: outputs carry those
        self.searches: list[_Search] = []
        self.todo: list[tuple[_Search, BeamSearchSequence]] = []
        self.steps = 0

    def prompts(self) -> list:
        return self.first if self.first is not None else [beam.tokens for _, beam in self.todo]

    def take(self, outs: Sequence[RequestOutput]) -> None:
        if self.first is not None:
            self.first = None
            for out in outs:
                root = BeamSearchSequence(list(out.prompt_token_ids))
                self.searches.append(_Search(root.tokens, [root]))
                self.todo.append((self.searches[-1], root))
        width = self.params.beam_width
        for (search, beam), out in zip(self.todo, outs):
            (entry,) = out.outputs[0].logprobs
            offered = dict(sorted(entry.items(), key=lambda kv: (-kv[1], kv[0]))[:2 * width])
            drawn = out.outputs[0].token_ids[0]
            offered[drawn] = entry[drawn]
            for token, logprob in offered.items():
                search.children.append(BeamSearchSequence(beam.tokens + [token], beam.logprobs + [entry],
                                                          beam.cum_logprob + logprob))
        self.steps += 1
        for search in self.searches:
            search.live = []
            for child in sorted(search.children, key=lambda b: -b.cum_logprob):
                if not self.params.ignore_eos and child.tokens[-1] in self.eos_ids:
                    child.finish_reason = "stop"
                    search.done.append(child)
                elif len(search.live) < width:
                    search.live.append(child)
            search.children = []
            if self.steps == self.params.max_tokens or len(search.prompt) + self.steps >= self.max_model_len:
                for beam in search.live:
                    beam.finish_reason = "length"
                search.done += search.live
                search.live = []
        self.todo = [(search, beam) for search in self.searches for beam in search.live]

    def results(self, decode: Optional[Callable[[list[int]], str]] = None) -> list[BeamSearchOutput]:
        """Each prompt's best beams; ``decode`` gives each its text (None: no text)."""
        results = []
        for search in self.searches:
            best = sorted(search.done, key=lambda b: -beam_score(b, self.eos_ids, self.params.length_penalty))
            for beam in best[:self.params.beam_width]:
                beam.text = None if decode is None else decode(beam.tokens)
            results.append(BeamSearchOutput(best[:self.params.beam_width]))
        return results


def beam_search(generate: Callable[[list, SamplingParams], list[RequestOutput]], prompts: Sequence,
                params: BeamSearchParams, eos_ids: frozenset[int], max_model_len: int,
                decode: Optional[Callable[[list[int]], str]] = None) -> list[BeamSearchOutput]:
    """The search run to its end; ``generate(prompts, sampling_params)``: LLM.generate for the engine searched."""
    search = BeamSearch(prompts, params, eos_ids, max_model_len)
    while batch := search.prompts():
        search.take(generate(batch, params.step_params()))
    return search.results(decode)
