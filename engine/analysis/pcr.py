"""Path coverage rate (paper Eq. 2): how much of the RL model's greedy path the base model predicts.

The RL model decodes greedily; its path is teacher-forced through the base model (or through M̃ when a
small pair is given, the paper's Sec. 4.2 variant), and each completion token counts as covered when
the scorer's argmax at that position is that token. Every completion token is scored, the first one
included (it is predicted from the prompt). The dataset figure is the mean over trajectories (the
paper's sample-level average); the pooled token-level rate is reported beside it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from rast_engine.analysis.trajectories import (Trajectory, TrajectorySettings, completion_rows, free_memory,
                                               generate_trajectories, score_each)
from rast_engine.errors import RastError


def coverage_mask(rows: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """[n] bool: argmax(rows[i]) == tokens[i]. Ties in the argmax go to the lowest id, as the sampler's
    greedy does."""
    if rows.shape[0] != len(tokens):
        raise ValueError(f"{rows.shape[0]} rows for {len(tokens)} tokens")
    return rows.argmax(dim=-1) == torch.tensor(tokens, dtype=torch.long)


def path_coverage(rows: torch.Tensor, tokens: list[int]) -> float:
    """Eq. 2 for one trajectory: the fraction of its tokens that are the scorer's argmax."""
    if not tokens:
        raise ValueError("an empty trajectory has no path coverage")
    return coverage_mask(rows, tokens).float().mean().item()


@dataclass(kw_only=True)
class PcrConfig(TrajectorySettings):
    rl: str
    base: str
    small_rl: str | None = None
    small_base: str | None = None
    lam: float = 1.0
    top: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.small_rl is None) != (self.small_base is None):
            raise RastError("--small-rl and --small-base go together")
        if self.small_rl is None and self.lam != 1.0:  # checked before the RL paths are decoded
            raise RastError(f"--lam {self.lam:g} weighs --small-rl and --small-base, and none is given")
        if self.top < 0:
            raise RastError("--top must be >= 0")


def _rl_paths(cfg: PcrConfig) -> list[Trajectory]:
    from rast_engine import LLM

    problems, template = cfg.inputs()
    llm = LLM(cfg.rl, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
    return generate_trajectories(llm, problems, template, cfg.max_tokens, seed=cfg.seed)


def run_pcr(cfg: PcrConfig) -> dict[str, Any]:
    from rast_engine import LLM

    paths = _rl_paths(cfg)
    free_memory()  # the RL engine is gone; the scorer may now take its memory
    scorer = LLM(cfg.base, cfg.small_rl, cfg.small_base, lam=cfg.lam, device=cfg.device, dtype=cfg.dtype,
                 seed=cfg.seed)
    tokenizer = scorer.get_tokenizer()
    per_traj, missed = [], Counter()
    covered = total = 0
    for traj, s in score_each(scorer, paths):
        rows = completion_rows(s.combined, traj)  # Eq. 3 with the scorer's λ; the base alone without a pair
        mask = coverage_mask(rows, traj.completion_ids)
        covered += int(mask.sum())
        total += len(mask)
        missed.update(t for t, ok in zip(traj.completion_ids, mask.tolist()) if not ok)
        per_traj.append({"id": traj.id, "tokens": len(mask), "pcr": mask.float().mean().item(),
                         "completion_ids": traj.completion_ids})
    if not per_traj:
        raise RastError("every RL trajectory came back empty; nothing to score")
    return {
        "pcr": sum(t["pcr"] for t in per_traj) / len(per_traj),
        "token_pcr": covered / total,
        "num_trajectories": len(per_traj),
        "num_tokens": total,
        "scorer": "M~ (base + λ·ΔR)" if cfg.small_rl else "base",
        "most_missed_tokens": [{"token": tokenizer.decode([t]), "id": t, "count": c}
                               for t, c in missed.most_common(cfg.top)],
        "trajectories": per_traj,
    }
