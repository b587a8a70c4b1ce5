"""Trajectories to analyse: one decoding path per problem, and the score rows that predict its tokens.

A trajectory is prompt + completion. `LLM.score` returns row t = the distribution of token t+1, so the
completion tokens at positions P..L-1 (P = prompt length) are predicted by rows P-1..L-2.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

import torch

from rast_engine.errors import RastError
from rast_engine.evaluation.data import Problem, load_problems
from rast_engine.evaluation.templates import PromptTemplate, load_template


@dataclass(kw_only=True)
class TrajectorySettings:
    """What every analysis shares: which problems, how they are prompted and decoded, where it runs."""
    data: str
    template: str = "a"
    max_tokens: int = 1024
    limit: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise RastError("--max-tokens must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise RastError("--limit must be >= 1")

    def inputs(self) -> tuple[list[Problem], PromptTemplate]:
        """The problems and the prompt template, read before any model loads: a bad file fails at once."""
        return load_problems(self.data, self.limit), load_template(self.template)


@dataclass(kw_only=True)
class TripleSettings(TrajectorySettings):
    """An analysis of M~ = M + λ·(R − S): the triple and λ as well."""
    model: str
    small_rl: str
    small_base: str
    lam: float = 1.0


@dataclass(frozen=True)
class Trajectory:
    id: str
    prompt_ids: list[int]
    completion_ids: list[int]

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"trajectory {self.id!r} has an empty prompt")

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids


def generate_trajectories(llm: Any, problems: list[Problem], template: PromptTemplate, max_tokens: int,
                          temperature: float = 0.0, seed: int = 0, **params: Any) -> list[Trajectory]:
    """One path per problem: greedy by default (the paper's setting, free of sampling noise); `params`
    go to SamplingParams (e.g. lam=0.0 to decode with the large model alone)."""
    from rast_engine import SamplingParams
    from rast_engine.evaluation.sampling import request_seed

    tokenizer = llm.get_tokenizer()
    prompts = [template.render(p.problem, tokenizer) for p in problems]
    # One seed per problem: a shared seed would give every prompt the same random stream, so sampled
    # paths would choose their branches together.
    sps = [SamplingParams(n=1, temperature=temperature, max_tokens=max_tokens, stop=list(template.stop) or None,
                          seed=request_seed(seed, p.id, 0), **params) for p in problems]
    outputs = llm.generate(prompts, sps, use_tqdm=True)
    return [Trajectory(p.id, list(o.prompt_token_ids), list(o.outputs[0].token_ids))
            for p, o in zip(problems, outputs)]


def completion_rows(scores: torch.Tensor, traj: Trajectory) -> torch.Tensor:
    """The rows of a [L, V] score tensor that predict the completion tokens: [len(completion), V]."""
    p, length = len(traj.prompt_ids), len(traj.token_ids)
    if scores.shape[0] != length:
        raise ValueError(f"scores have {scores.shape[0]} rows for a trajectory of {length} tokens")
    return scores[p - 1:length - 1]


def free_memory() -> None:
    """Give a dropped engine's memory back before the next one loads (two large models rarely fit at
    once). Call it after the last reference to the engine is gone, e.g. after the function that built
    it has returned."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_each(llm: Any, paths: list[Trajectory]) -> Iterator[tuple[Trajectory, Any]]:
    """(trajectory, ScoreOutput) one trajectory at a time: a score is [L, V] float32 per model on the
    host (about 0.6 GB per model for 1k tokens of a 152k vocabulary), so callers reduce each one to
    per-position numbers before the next is made. Trajectories with no completion are skipped."""
    from tqdm import tqdm

    for traj in tqdm(paths, desc="score", unit="traj"):
        if traj.completion_ids:
            yield traj, llm.score([traj.token_ids], output="logits")[0]
