"""Per-token KL(M̃ ‖ M_base) along M̃'s own trajectories (paper Sec. 4.2, Fig. 5).

M̃ = softmax(large + Σ λ·ΔR) and M_base = softmax(large) are both read at temperature 1 from one
teacher-forced pass of the RAST engine over paths that M̃ decoded itself. A large KLD marks the tokens
where ΔR moved the large model most; the paper finds reasoning words ("check") among them.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from rast_engine.analysis.kld_html import token_pieces
from rast_engine.analysis.trajectories import TripleSettings, completion_rows, generate_trajectories, score_each
from rast_engine.errors import RastError


def token_kld(p_logits: torch.Tensor, q_logits: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """[n] KL(softmax(p) ‖ softmax(q)) per row, in float64 (terms are summed over a whole vocabulary),
    `chunk` rows at a time to bound the float64 temporaries. Tokens p gives no mass add nothing; mass
    on a token q rules out gives +inf, as the definition demands."""
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"shape mismatch {tuple(p_logits.shape)} vs {tuple(q_logits.shape)}")
    out = []
    for start in range(0, p_logits.shape[0], chunk):
        logp = torch.log_softmax(p_logits[start:start + chunk].double(), dim=-1)
        logq = torch.log_softmax(q_logits[start:start + chunk].double(), dim=-1)
        p = logp.exp()
        out.append(torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(dim=-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@dataclass(kw_only=True)
class KldConfig(TripleSettings):
    temperature: float = 0.0
    top: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top < 1:
            raise RastError("--top must be >= 1")


def run_kld(cfg: KldConfig) -> dict[str, Any]:
    from rast_engine import LLM

    problems, template = cfg.inputs()
    llm = LLM(cfg.model, cfg.small_rl, cfg.small_base, lam=cfg.lam, device=cfg.device, dtype=cfg.dtype,
              seed=cfg.seed)
    tokenizer = llm.get_tokenizer()
    paths = generate_trajectories(llm, problems, template, cfg.max_tokens, temperature=cfg.temperature,
                                  seed=cfg.seed)
    positions: list[dict[str, Any]] = []
    per_traj: list[dict[str, Any]] = []
    by_token: dict[int, list[float]] = defaultdict(list)
    for traj, s in score_each(llm, paths):
        large = completion_rows(s.large, traj)
        kld = token_kld(completion_rows(s.combined, traj), large).tolist()
        per_traj.append({"id": traj.id, "tokens": len(kld), "mean_kld": sum(kld) / len(kld), "kld": kld,
                         "completion_ids": traj.completion_ids,
                         "pieces": token_pieces(tokenizer.decode, traj.completion_ids),
                         # what the large model alone would have chosen there (its argmax), and its text
                         "large_argmax": (choice := large.argmax(-1).tolist()),
                         "large_choice": [tokenizer.decode([t]) for t in choice]})
        for i, (tok, value) in enumerate(zip(traj.completion_ids, kld)):
            by_token[tok].append(value)
            positions.append({"id": traj.id, "position": i, "token_id": tok, "kld": value})
    if not positions:
        raise RastError("every trajectory came back empty; nothing to score")
    positions.sort(key=lambda r: -r["kld"])
    for r in positions[:cfg.top]:
        r["token"] = tokenizer.decode([r["token_id"]])
    tokens = sorted(({"token": tokenizer.decode([t]), "token_id": t, "count": len(v), "mean_kld": sum(v) / len(v),
                      "max_kld": max(v)} for t, v in by_token.items()), key=lambda r: -r["mean_kld"])
    return {
        "mean_kld": sum(r["kld"] for r in positions) / len(positions),
        "num_trajectories": len(per_traj),
        "num_tokens": len(positions),
        "lam": cfg.lam,
        "top_positions": positions[:cfg.top],
        "top_tokens": tokens[:cfg.top],
        "trajectories": per_traj,
    }
