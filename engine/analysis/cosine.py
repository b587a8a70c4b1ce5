"""Mean cosine similarity of two delta-logit signals ΔR_k = R_k − S_k along trajectories (paper Sec. 4.1).

The paths are the trajectory model's own greedy decodes. One engine holds that model as its large model
and both pairs as experts with weight 0, so it decodes exactly as the model alone while one teacher-
forced pass yields both ΔR at every prefix. The cosine is taken per position over the shared
vocabulary, averaged over a trajectory, then over trajectories (the paper's AvgCosineSim).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rast_engine.analysis.trajectories import TrajectorySettings, completion_rows, generate_trajectories, score_each
from rast_engine.errors import RastError


def cosine_rows(a: torch.Tensor, b: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """[n] cosine of matching rows, in float64 and `chunk` rows at a time; 0 where either row is all
    zeros (no direction)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    out = []
    for start in range(0, a.shape[0], chunk):
        x, y = a[start:start + chunk].double(), b[start:start + chunk].double()
        norms = x.norm(dim=-1) * y.norm(dim=-1)
        dots = (x * y).sum(dim=-1)
        out.append(torch.where(norms > 0, dots / norms.clamp_min(torch.finfo(torch.float64).tiny),
                               torch.zeros_like(dots)))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def mean_cosine(delta1: torch.Tensor, delta2: torch.Tensor) -> float:
    """The mean over positions of cos(ΔR1[t], ΔR2[t]) for one trajectory."""
    if delta1.shape[0] == 0:
        raise ValueError("an empty trajectory has no cosine similarity")
    return cosine_rows(delta1, delta2).mean().item()


@dataclass(kw_only=True)
class CosineConfig(TrajectorySettings):
    model: str
    deltas: list[tuple[str, str]]

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.deltas) != 2 or any(len(d) != 2 for d in self.deltas):
            raise RastError("give exactly two --delta RL BASE pairs")


def run_cosine(cfg: CosineConfig) -> dict[str, Any]:
    from rast_engine import LLM

    problems, template = cfg.inputs()
    experts = [(rl, base, 0.0) for rl, base in cfg.deltas]  # weight 0: decode as the model alone
    llm = LLM(cfg.model, experts=experts, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
    paths = generate_trajectories(llm, problems, template, cfg.max_tokens, seed=cfg.seed)
    per_traj = []
    for traj, s in score_each(llm, paths):
        (rl1, base1), (rl2, base2) = s.deltas
        cos = cosine_rows(completion_rows(rl1 - base1, traj), completion_rows(rl2 - base2, traj))
        per_traj.append({"id": traj.id, "tokens": len(cos), "mean_cosine": cos.mean().item(),
                         "completion_ids": traj.completion_ids})
    if not per_traj:
        raise RastError("every trajectory came back empty; nothing to score")
    return {
        "mean_cosine": sum(t["mean_cosine"] for t in per_traj) / len(per_traj),
        "num_trajectories": len(per_traj),
        "num_tokens": sum(t["tokens"] for t in per_traj),
        "deltas": [list(d) for d in cfg.deltas],
        "trajectories": per_traj,
    }
