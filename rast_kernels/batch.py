"""Argument normalisation shared by every sampler backend.

``rast_sample`` / ``rast_probs`` accept Python scalars or per-row tensors for every parameter. They are
turned into one ``SamplingBatch`` of per-row device tensors here, once, so each backend (torch
reference, Triton, native) sees the same validated inputs. Python scalars are validated with clear
errors. Per-row tensors are not inspected on the host (that would force a device sync and break CUDA
graphs); they are clamped on the device to their meaningful range instead:
temperature <= 0 means greedy, top_k <= 0 or >= V means off, top_p is clamped to [tiny, 1],
min_p to [0, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

Scalar = Union[int, float]
RowParam = Union[Scalar, torch.Tensor]
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TINY = torch.finfo(torch.float32).tiny


@dataclass
class SamplingBatch:
    logits: torch.Tensor  # [B, V0] of the large base model
    rl: list[torch.Tensor]  # K tensors [B, Vk]
    base: list[torch.Tensor]  # K tensors [B, Vk]
    weights: torch.Tensor  # [B, K] float32
    temperature: torch.Tensor  # [B] float32; <= 0 is greedy
    top_k: torch.Tensor  # [B] int32; <= 0 is off
    top_p: torch.Tensor  # [B] float32 in [tiny, 1]
    min_p: torch.Tensor  # [B] float32 in [0, 1]
    seed: torch.Tensor  # [B] int64
    offset: torch.Tensor  # [B] int64
    vocab: int  # V: ids >= V are never returned

    @property
    def batch(self) -> int:
        return int(self.logits.shape[0])

    @property
    def pairs(self) -> int:
        return len(self.rl)


def _check_logits(name: str, t: torch.Tensor, batch: int | None, device: torch.device | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [batch, vocab], got shape {tuple(t.shape)}")
    if t.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous along the vocabulary dimension")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name} has batch {t.shape[0]}, the large model's logits have {batch}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, the large model's logits are on {device}")


def _row_param(name: str, value: RowParam, batch: int, device: torch.device, dtype: torch.dtype,
               lo: float, hi: float, integral: bool = False) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"{name} must be a scalar or a [{batch}] tensor, got shape {tuple(value.shape)}")
        if integral and value.is_floating_point():
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        out = value.to(device=device, dtype=dtype)
        return out if integral else out.clamp(lo, hi)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if integral and not float(value).is_integer():
        raise ValueError(f"{name} must be an integer, got {value}")
    if not integral and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if not integral and not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return torch.full((batch,), value, device=device, dtype=dtype)


def _weights(weights: Union[Scalar, Sequence[Scalar], torch.Tensor], batch: int, pairs: int,
             device: torch.device) -> torch.Tensor:
    if isinstance(weights, torch.Tensor):
        w = weights.to(device=device, dtype=torch.float32)
        if w.dim() == 0:
            return w.reshape(1, 1).expand(batch, pairs)
        if w.dim() == 1 and w.shape[0] == pairs:
            return w[None, :].expand(batch, pairs)
        if w.dim() == 2 and tuple(w.shape) == (batch, pairs):
            return w
        raise ValueError(f"weights tensor must have shape [], [{pairs}] or [{batch}, {pairs}], got {tuple(w.shape)}")
    if isinstance(weights, (int, float)) and not isinstance(weights, bool):
        values = [float(weights)] * pairs
    else:
        values = [float(x) for x in weights]
        if len(values) != pairs:
            raise ValueError(f"got {len(values)} weights for {pairs} delta pairs")
    if not all(math.isfinite(x) for x in values):
        raise ValueError(f"weights must be finite, got {values}")
    # fills, not a copy of host data: a CUDA-graph capture can record them (the values frozen into it)
    out = torch.empty((batch, pairs), dtype=torch.float32, device=device)
    for k, x in enumerate(values):
        out[:, k].fill_(x)
    return out


def normalize(logits: torch.Tensor, deltas: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
              weights: Union[Scalar, Sequence[Scalar], torch.Tensor] = 1.0, temperature: RowParam = 1.0,
              top_k: RowParam = 0, top_p: RowParam = 1.0, min_p: RowParam = 0.0, seed: RowParam = 0,
              offset: RowParam = 0, vocab_size: int | None = None) -> SamplingBatch:
    _check_logits("logits", logits, None, None)
    batch, device = int(logits.shape[0]), logits.device
    rl: list[torch.Tensor] = []
    base: list[torch.Tensor] = []
    for k, pair in enumerate(deltas):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"deltas[{k}] must be a pair (rl_logits, base_logits)")
        _check_logits(f"deltas[{k}][0]", pair[0], batch, device)
        _check_logits(f"deltas[{k}][1]", pair[1], batch, device)
        rl.append(pair[0])
        base.append(pair[1])
    widths = [int(logits.shape[1])] + [int(t.shape[1]) for t in rl + base]
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        widths.append(vocab_size)
    vocab = min(widths)
    if vocab <= 0:
        raise ValueError("the vocabulary is empty")
    return SamplingBatch(
        logits=logits, rl=rl, base=base,
        weights=_weights(weights, batch, len(rl), device),
        temperature=_row_param("temperature", temperature, batch, device, torch.float32, 0.0, math.inf),
        top_k=_row_param("top_k", top_k, batch, device, torch.int32, 0, 0, integral=True),
        top_p=_row_param("top_p", top_p, batch, device, torch.float32, TINY, 1.0),
        min_p=_row_param("min_p", min_p, batch, device, torch.float32, 0.0, 1.0),
        seed=_row_param("seed", seed, batch, device, torch.int64, 0, 0, integral=True),
        offset=_row_param("offset", offset, batch, device, torch.int64, 0, 0, integral=True),
        vocab=vocab,
    )
