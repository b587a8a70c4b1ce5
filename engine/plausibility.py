"""Contrastive decoding's adaptive plausibility constraint (Li et al., 2023), as a mask on z.

A token stays admissible only if the large model M alone gives it at least ``plausibility_alpha`` times
the probability of M's most likely token: logit_M(x) >= max_y logit_M(y) + ln α, over the vocabulary
every model shares, at temperature 1. With small_rl set to M's own directory (loaded and run once, so
the step costs M and S) and lam = β, z = M + β (M − S) = (1 + β) M − β S, and this mask makes it
contrastive decoding (O'Brien & Lewis, 2023: α = 0.1, β = 0.5), the decoding-time baseline the RAST
reviews ask for; with RAST's own triple it keeps the delta from promoting tokens M finds implausible.
M's argmax always survives, so the mask alone never empties a row.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence as Seq

import torch

if TYPE_CHECKING:
    from rast_engine.sampling_params import SamplingParams


def mask_implausible(z: torch.Tensor, large: torch.Tensor, params: Seq[SamplingParams], vocab: int,
                     to_device: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """−inf in z [rows, vocab] wherever row i's token is implausible under ``large`` [rows, >= vocab] (the
    first model's logits of the rows), for the rows whose params[i].plausibility_alpha > 0; in place."""
    at = [i for i, p in enumerate(params) if p.plausibility_alpha > 0]
    if not at:
        return
    rows = to_device(torch.tensor(at, dtype=torch.int64))
    m = large.index_select(0, rows)[:, :vocab].float()
    log_alpha = to_device(torch.tensor([math.log(params[i].plausibility_alpha) for i in at], dtype=torch.float32))
    far = m < m.max(dim=-1, keepdim=True).values + log_alpha[:, None]
    z.index_copy_(0, rows, z.index_select(0, rows).masked_fill(far, float("-inf")))
