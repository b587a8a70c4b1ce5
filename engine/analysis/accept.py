"""Does speculative decoding pay for RAST? Draft acceptance along M̃'s own paths (`rast analyze accept`).

The engine's speculative rounds (engine/speculative) draft γ tokens with the small models, run M once
over all of them and keep the drafts up to the first that fails, replaced by the target's token. In RAST
the small models read every token anyway, so a draft costs no extra model and only M is saved, one M
forward over γ + 1 positions a round instead of one a token (the reviewers' Q1). Two drafts come free:
- "rl": q = R's own distribution;
- "small": q from S + λ·(R − S), RAST's formula with S in M's place (the same as "rl" at λ = 1);
and the engine's two methods accept a draft from q at a position where the target is p with probability
- "rejection" (speculative sampling): α = Σ_x min(p, q), the most any method can;
- "coupled" (the plain sampler's own noise for both draws): α = P(argmax(log p + g) = argmax(log q + g))
  with shared Gumbel noise g, = Σ_i 1 / Σ_j max(p_j / p_i, q_j / q_i) (coupled_acceptance).
Target and drafts are read at the same temperature and top-p (rast_probs), along paths that the target
M̃ sampled with those settings, so α_t is the exact probability that a draft at position t of the path
passes (the coupled one summed over the TOP likeliest tokens: ``coupled_slack`` bounds what is left out).

A round starting at t yields E_γ(t) = 1 + Σ_{j=1..γ'} Π_{i<j} α_{t+i} tokens in expectation, with
γ' = min(γ, L - 1 - t) on a path of L tokens (a round never yields more than the tokens left). The report gives their mean over t and the weight-bytes bound on the
speed-up: E_γ times the bytes of a plain step (M + the pair) over the bytes of a round (M once, the pair
γ + 1 times). It leaves out KV reads and M's compute over γ + 1 positions (small at decode batch
sizes, where a step is bound by reading weights): a bound to decide whether it pays, not a measurement.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rast_engine.analysis.trajectories import TripleSettings, completion_rows, generate_trajectories, score_each
from rast_engine.errors import RastError

DRAFTS = ("rl", "small")
METHODS = ("coupled", "rejection")  # the engine's speculative_method
ROWS = 64  # rows of [ROWS, V] float32 probabilities at a time, per distribution
TOP = 64  # tokens per row whose coupled-acceptance terms are summed exactly (coupled_acceptance)


def acceptance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[n] float64: Σ_x min(p(x), q(x)) per row, the probability that a draft from q is accepted by p."""
    if p.shape != q.shape:
        raise ValueError(f"shape mismatch {tuple(p.shape)} vs {tuple(q.shape)}")
    return torch.minimum(p.double(), q.double()).sum(dim=-1)


def coupled_acceptance(p: torch.Tensor, q: torch.Tensor, top: int = TOP) -> tuple[torch.Tensor, torch.Tensor]:
    """[n] float64 P(argmax(log p + g) = argmax(log q + g)) for shared Gumbel noise g, the coupled
    method's acceptance, and [n] the most the tokens left out could add. Both draws pick token i iff
    g_j <= g_i + min(log(p_i / p_j), log(q_i / q_j)) for every j; integrating over g_i gives
    1 / Σ_j max(p_j / p_i, q_j / q_i), at most min(p_i, q_i). Summed exactly over the ``top`` tokens of
    largest min(p_i, q_i) (O(top x V) a row); each other token adds at most its min(p_i, q_i)."""
    p, q = p.double(), q.double()
    m = torch.minimum(p, q)
    mins, idx = m.topk(min(top, p.shape[-1]), dim=-1)
    out = []
    for r in range(p.shape[0]):
        keep = idx[r][mins[r] > 0]
        ratio = torch.maximum(p[r][None, :] / p[r, keep][:, None], q[r][None, :] / q[r, keep][:, None])
        out.append((1 / ratio.sum(-1)).sum())
    value = torch.stack(out) if out else m.new_zeros(0)
    return value, m.sum(-1) - mins.sum(-1)


def expected_tokens(alpha: Sequence[float], gamma: int) -> float:
    """The mean over start positions t of E_γ(t) = 1 + Σ_{j=1..γ'} Π_{i<j} α_{t+i}, with γ' = min(γ, L - 1 - t)
    drafts: a round from t yields at most the L - t tokens left on the path (α_t accepts the draft of
    position t; the last position has no draft after it)."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if not alpha:
        raise ValueError("no acceptance probabilities")
    total = 0.0
    for t in range(len(alpha)):
        run = e = 1.0
        for a in alpha[t:min(t + gamma, len(alpha) - 1)]:
            run *= a
            e += run
        total += e
    return total / len(alpha)


def speedup_bound(tokens_per_round: float, gamma: int, large_bytes: int, pair_bytes: int) -> float:
    """Tokens per weight byte of a speculative round over those of a plain RAST step."""
    return tokens_per_round * (large_bytes + pair_bytes) / (large_bytes + (gamma + 1) * pair_bytes)


def weight_bytes(*models: torch.nn.Module, besides: torch.nn.Module | None = None) -> int:
    """Bytes of the distinct weight storages of ``models`` (a LoRA RL model shares its base's: read once),
    leaving out those ``besides`` holds (a base that is the large model)."""
    held = {} if besides is None else {p.untyped_storage().data_ptr() for p in besides.parameters()}
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for m in models for p in m.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in held)


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
                    top_p: float) -> tuple[dict[str, list[float]], float]:
    """α_t of each (draft, method), keyed "draft/method", for [n, V] logits rows of one path (row t
    predicts completion token t); and the most the coupled values could miss at any position."""
    from rast_kernels import rast_probs

    out: dict[str, list[float]] = {f"{d}/{m}": [] for d in DRAFTS for m in METHODS}
    knobs = dict(temperature=temperature, top_p=top_p)
    slack = 0.0
    for s in range(0, large.shape[0], ROWS):
        m, r, b = large[s:s + ROWS], rl[s:s + ROWS], base[s:s + ROWS]
        target = rast_probs(m, [(r, b)], weights=lam, **knobs)
        for d, q in (("rl", rast_probs(r, **knobs)), ("small", rast_probs(b, [(r, b)], weights=lam, **knobs))):
            out[f"{d}/rejection"] += acceptance(target, q).tolist()
            coupled, left_out = coupled_acceptance(target, q)
            out[f"{d}/coupled"] += coupled.tolist()
            slack = max(slack, float(left_out.max()) if len(left_out) else 0.0)
    return out, slack


def run_accept(cfg: AcceptConfig) -> dict[str, Any]:
    from rast_engine import LLM

    problems, template = cfg.inputs()
    llm = LLM(cfg.model, cfg.small_rl, cfg.small_base, lam=cfg.lam, device=cfg.device, dtype=cfg.dtype,
              seed=cfg.seed)
    models = llm.llm_engine.model_set.models
    large_bytes, pair_bytes = weight_bytes(models[0]), weight_bytes(models[1], models[2], besides=models[0])
    paths = generate_trajectories(llm, problems, template, cfg.max_tokens, temperature=cfg.temperature,
                                  seed=cfg.seed, top_p=cfg.top_p)
    per_traj: list[dict[str, Any]] = []
    slack = 0.0
    for traj, s in score_each(llm, paths):
        rl, base = s.deltas[0]
        alpha, left_out = path_acceptance(*(completion_rows(x, traj) for x in (s.large, rl, base)), cfg.lam,
                                          cfg.temperature, cfg.top_p)
        slack = max(slack, left_out)
        per_traj.append({"id": traj.id, "tokens": len(traj.completion_ids), "completion_ids": traj.completion_ids,
                         "acceptance": alpha})
    if not per_traj:
        raise RastError("every trajectory came back empty; nothing to score")
    drafts = {}
    for d in per_traj[0]["acceptance"]:
        alphas = [a for t in per_traj for a in t["acceptance"][d]]
        rows = []
        for gamma in range(1, cfg.max_gamma + 1):
            # rounds run within a path: the mean over paths' positions, weighted by their lengths
            e = sum(expected_tokens(t["acceptance"][d], gamma) * t["tokens"] for t in per_traj) / len(alphas)
            rows.append({"gamma": gamma, "tokens_per_round": e,
                         "speedup_bound": speedup_bound(e, gamma, large_bytes, pair_bytes)})
        drafts[d] = {"mean_acceptance": sum(alphas) / len(alphas), "by_gamma": rows,
                     "best_gamma": max(rows, key=lambda r: r["speedup_bound"])["gamma"]}
    return {"lam": cfg.lam, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "num_trajectories": len(per_traj), "num_tokens": sum(t["tokens"] for t in per_traj),
            "weight_bytes": {"large": large_bytes, "pair": pair_bytes}, "drafts": drafts, "coupled_slack": slack,
            "trajectories": per_traj}
