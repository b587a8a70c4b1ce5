"""Speculative sampling's accept/reject step for a batch of rounds, exact and counter-based.

For draft token x_j drawn from q_j, accept it iff u_j · q_j(x_j) < p_j(x_j) (u_j uniform in (0, 1): with
probability min(1, p/q), without dividing by q) and q_j(x_j) > 0; the first rejected position
a takes its token from norm(max(0, p_a − q_a)), and a round whose γ drafts all pass takes one more from
p_γ (as if q_γ = 0). Draws from the residual are Gumbel-max over log r: exact for any weights r >= 0.
Every uniform is keyed by (seed, offset + position) through rast_kernels.rng, so the outcome of a row
depends on nothing else in the batch.
"""
from __future__ import annotations

import torch

from rast_kernels.rng import row_key, token_gumbel, token_uniform

# xor masks that give each use of a sequence's seed its own stream (draft draws, accept tests, residual
# draws); none is 0, so none reuses the stream of the plain sampler keyed by the seed itself
DRAFT_SALT = 0x243F6A8885A308D3
ACCEPT_SALT = 0x13198A2E03707344
RESIDUAL_SALT = 0xA4093822299F31D0


def accept_drafts(target: torch.Tensor, draft: torch.Tensor, drafts: torch.Tensor, accept_seed: torch.Tensor,
                  residual_seed: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """target [B, G + 1, V] and draft [B, G, V] float32 probabilities (rows summing to 1, or all zero for
    a row with no admissible token), drafts [B, G] int64 drawn from ``draft``; accept_seed, residual_seed,
    offset [B] int64. Returns (accepted [B] int64 in [0, G], the next token [B] int64, -1 where the
    position's target row admits nothing)."""
    bsz, g1, vocab = target.shape
    g = g1 - 1
    if draft.shape != (bsz, g, vocab) or drafts.shape != (bsz, g):
        raise ValueError(f"shapes: target {tuple(target.shape)}, draft {tuple(draft.shape)}, "
                         f"drafts {tuple(drafts.shape)}")
    pos = torch.arange(g, device=target.device, dtype=torch.int64)
    p_x = target[:, :g].gather(2, drafts[..., None])[..., 0]
    q_x = draft.gather(2, drafts[..., None])[..., 0]
    keys = row_key(accept_seed[:, None].expand(bsz, g).reshape(-1), (offset[:, None] + pos).reshape(-1))
    u = token_uniform(keys, 1).view(bsz, g)
    # q_x = 0 (a draft its own distribution rules out: a row that admitted nothing) is always rejected
    accepted = ((u * q_x < p_x) & (q_x > 0)).to(torch.int64).cumprod(1).sum(1)
    rows = torch.arange(bsz, device=target.device)
    q_a = draft[rows, accepted.clamp(max=max(g - 1, 0))] if g else torch.zeros_like(target[:, 0])
    q_a = torch.where((accepted < g)[:, None], q_a, torch.zeros_like(q_a))
    p_a = target[rows, accepted]
    residual = (p_a - q_a).clamp(min=0)
    # p <= q everywhere, p != q, happens by rounding alone (p = q in exact arithmetic, where no rejection
    # has any chance): a rejection there draws from p itself, never from nothing
    residual = torch.where((residual > 0).any(1, keepdim=True), residual, p_a)
    noise = token_gumbel(row_key(residual_seed, offset + accepted), vocab)
    score = torch.where(residual > 0, residual.log() + noise, torch.full_like(residual, float("-inf")))
    best, nxt = score.max(1)
    return accepted, torch.where(best > float("-inf"), nxt, torch.full_like(nxt, -1))
