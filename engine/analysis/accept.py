"""Would speculative decoding pay for RAST? Draft acceptance along M̃'s own paths (`rast analyze accept`).

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) draws γ tokens from a draft q, runs the
target once over all of them, accepts draft token x with probability min(1, p(x) / q(x)), replaces the
first rejected one by a draw from norm(max(0, p - q)) and, when all γ pass, adds a draw from p: the
output is distributed exactly as p, and a draft token is accepted with probability α = Σ_x min(p, q).

In RAST the small models read every token anyway, so a draft costs no extra model: while R and S draft
γ tokens they also compute their terms of the target at those positions, and only M is saved, one M
forward over γ + 1 positions a round instead of one a token (the reviewers' Q1). Two drafts come free:
- "rl": q = R's own distribution;
- "small": q from S + λ·(R − S), RAST's formula with S in M's place (the same as "rl" at λ = 1).
Target and drafts are read at the same temperature and top-p (rast_probs), along paths that the target
M̃ sampled with those settings, so α_t is the exact probability that a draft token at position t of the
path is accepted.

A round starting at t yields E_γ(t) = 1 + Σ_{j=1..γ} Π_{i<j} α_{t+i} tokens in expectation (a round
never runs past the path's end). The report gives their mean over t and the weight-bytes bound on the
speed-up: E_γ times the bytes of a plain step (M + the pair) over the bytes of a round (M once, the pair
γ + 1 times). It leaves out KV reads and M's compute over γ + 1 positions (small at decode batch
sizes, where a step is bound by reading weights): a bound to decide whether to build it, not a measurement.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rast_engine.analysis.trajectories import TripleSettings, completion_rows, generate_trajectories, score_each
from rast_engine.errors import RastError
from rast_engine.evaluation.data import load_problems
from rast_engine.evaluation.templates import load_template

DRAFTS = ("rl", "small")
ROWS = 64  # rows of [ROWS, V] float32 probabilities at a time, per distribution


def acceptance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[n] float64: Σ_x min(p(x), q(x)) per row, the probability that a draft from q is accepted by p."""
    if p.shape != q.shape:
        raise ValueError(f"shape mismatch {tuple(p.shape)} vs {tuple(q.shape)}")
    return torch.minimum(p.double(), q.double()).sum(dim=-1)


def expected_tokens(alpha: Sequence[float], gamma: int) -> float:
    """The mean over start positions t of E_γ(t) = 1 + Σ_{j=1..γ} Π_{i<j} α_{t+i}, cut at the end."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if not alpha:
        raise ValueError("no acceptance probabilities")
    total = 0.0
    for t in range(len(alpha)):
        run = e = 1.0
        for a in alpha[t:t + gamma]:
            run *= a
            e += run
        total += e
    return total / len(alpha)


def speedup_bound(tokens_per_round: float, gamma: int, large_bytes: int, pair_bytes: int) -> float:
    """Tokens per weight byte of a speculative round over those of a plain RAST step."""
    return tokens_per_round * (large_bytes + pair_bytes) / (large_bytes + (gamma + 1) * pair_bytes)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@dataclass(kw_only=True)
class AcceptConfig(TripleSettings):
    temperature: float = 1.0
    top_p: float = 0.95
    max_gamma: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature < 0:
            raise RastError("--temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise RastError("--top-p must be in (0, 1]")
        if self.max_gamma < 1:
            raise RastError("--max-gamma must be >= 1")


def path_acceptance(large: torch.Tensor, rl: torch.Tensor, base: torch.Tensor, lam: float, temperature: float,
                    top_p: float) -> dict[str, list[float]]:
    """α_t of each draft for [n, V] logits rows of one path (row t predicts completion token t)."""
    from rast_kernels import rast_probs

    out: dict[str, list[float]] = {d: [] for d in DRAFTS}
    knobs = dict(temperature=temperature, top_p=top_p)
    for s in range(0, large.shape[0], ROWS):
        m, r, b = large[s:s + ROWS], rl[s:s + ROWS], base[s:s + ROWS]
        target = rast_probs(m, [(r, b)], weights=lam, **knobs)
        out["rl"] += acceptance(target, rast_probs(r, **knobs)).tolist()
        out["small"] += acceptance(target, rast_probs(b, [(r, b)], weights=lam, **knobs)).tolist()
    return out


def run_accept(cfg: AcceptConfig) -> dict[str, Any]:
    from rast_engine import LLM

    llm = LLM(cfg.model, cfg.small_rl, cfg.small_base, lam=cfg.lam, device=cfg.device, dtype=cfg.dtype,
              seed=cfg.seed)
    models = llm.llm_engine.model_set.models
    large_bytes, pair_bytes = weight_bytes(models[0]), weight_bytes(models[1]) + weight_bytes(models[2])
    paths = generate_trajectories(llm, load_problems(cfg.data, cfg.limit), load_template(cfg.template),
                                  cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed, top_p=cfg.top_p)
    per_traj: list[dict[str, Any]] = []
    for traj, s in score_each(llm, paths):
        rl, base = s.deltas[0]
        alpha = path_acceptance(*(completion_rows(x, traj) for x in (s.large, rl, base)), cfg.lam,
                                cfg.temperature, cfg.top_p)
        per_traj.append({"id": traj.id, "tokens": len(traj.completion_ids), "completion_ids": traj.completion_ids,
                         **{f"acceptance_{d}": alpha[d] for d in DRAFTS}})
    if not per_traj:
        raise RastError("every trajectory came back empty; nothing to score")
    drafts = {}
    for d in DRAFTS:
        alphas = [a for t in per_traj for a in t[f"acceptance_{d}"]]
        rows = []
        for gamma in range(1, cfg.max_gamma + 1):
            # rounds run within a path: the mean over paths' positions, weighted by their lengths
            e = sum(expected_tokens(t[f"acceptance_{d}"], gamma) * t["tokens"] for t in per_traj) / len(alphas)
            rows.append({"gamma": gamma, "tokens_per_round": e,
                         "speedup_bound": speedup_bound(e, gamma, large_bytes, pair_bytes)})
        drafts[d] = {"mean_acceptance": sum(alphas) / len(alphas), "by_gamma": rows,
                     "best_gamma": max(rows, key=lambda r: r["speedup_bound"])["gamma"]}
    return {"lam": cfg.lam, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "num_trajectories": len(per_traj), "num_tokens": sum(t["tokens"] for t in per_traj),
            "weight_bytes": {"large": large_bytes, "pair": pair_bytes}, "drafts": drafts,
            "trajectories": per_traj}
