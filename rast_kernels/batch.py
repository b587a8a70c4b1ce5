"""Argument normalisation shared by every sampler backend.

``rast_sample`` / ``rast_probs`` accept Python scalars or per-row tensors for every parameter. They are
validated here, once, into one ``SamplingBatch``, so each backend (torch reference, Triton, native) sees
the same inputs. Python scalars are validated with clear errors. Per-row tensors are not inspected on
the host (that would force a device sync and break CUDA graphs); they are clamped to their meaningful
range instead: temperature <= 0 means greedy and inf is float32's max (so d = (zmax - z) / T is never
inf / inf), top_k <= 0 or >= V means off, top_p is clamped to [tiny, 1], min_p to [0, 1].

Each parameter is kept as given (``RowValue``: the scalar, or the [B] tensor unclamped) and turned
into a clamped per-row tensor only when a backend asks for it (``SamplingBatch.temperature`` etc.):
the torch and native backends do; the Triton backend reads the raw values in its first kernel,
scalars as kernel arguments and tensors clamped in registers, so a call issues no device work besides
its own kernels (a scalar would cost a fill kernel, a clamp another one, each a launch at batch 1).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence, Union

import torch

Scalar = Union[int, float]
RowParam = Union[Scalar, torch.Tensor]
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TINY = torch.finfo(torch.float32).tiny
FLOAT32_MAX = torch.finfo(torch.float32).max
INT64 = (-2**63, 2**63 - 1)


class ParamSpec(NamedTuple):
    dtype: torch.dtype
    lo: float  # the clamp range of a float parameter (integer parameters are not clamped)
    hi: float
    integral: bool


PARAMS = {
    "temperature": ParamSpec(torch.float32, 0.0, FLOAT32_MAX, False),
    "top_k": ParamSpec(torch.int32, 0, 0, True),
    "top_p": ParamSpec(torch.float32, TINY, 1.0, False),
    "min_p": ParamSpec(torch.float32, 0.0, 1.0, False),
    "seed": ParamSpec(torch.int64, 0, 0, True),
    "offset": ParamSpec(torch.int64, 0, 0, True),
}


@dataclass(frozen=True)
class RowValue:
    """One validated per-row parameter: ``scalar`` for every row, or ``tensor`` [B] in the parameter's
    dtype on the logits' device, not yet clamped. Exactly one of them is set."""
    scalar: Scalar | None
    tensor: torch.Tensor | None


@dataclass
class SamplingBatch:
    logits: torch.Tensor  # [B, V0] of the large base model
    rl: list[torch.Tensor]  # K tensors [B, Vk]
    base: list[torch.Tensor]  # K tensors [B, Vk]
    weights: torch.Tensor  # [B, K] float32
    params: dict[str, RowValue]  # one entry per name in PARAMS
    vocab: int  # V: ids >= V are never returned
    _rows: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def rows(self, name: str) -> torch.Tensor:
        """The parameter as a clamped [B] tensor of its dtype (made once, on first use)."""
        if name not in self._rows:
            spec, value = PARAMS[name], self.params[name]
            if value.tensor is None:
                self._rows[name] = torch.full((self.batch,), value.scalar, device=self.logits.device,
                                              dtype=spec.dtype)
            else:
                self._rows[name] = value.tensor if spec.integral else value.tensor.clamp(spec.lo, spec.hi)
        return self._rows[name]

    @property
    def temperature(self) -> torch.Tensor:  # [B] float32; <= 0 is greedy
        return self.rows("temperature")

    @property
    def top_k(self) -> torch.Tensor:  # [B] int32; <= 0 is off
        return self.rows("top_k")

    @property
    def top_p(self) -> torch.Tensor:  # [B] float32 in [tiny, 1]
        return self.rows("top_p")

    @property
    def min_p(self) -> torch.Tensor:  # [B] float32 in [0, 1]
        return self.rows("min_p")

    @property
    def seed(self) -> torch.Tensor:  # [B] int64
        return self.rows("seed")

    @property
    def offset(self) -> torch.Tensor:  # [B] int64
        return self.rows("offset")

    @property
    def batch(self) -> int:
        return self.logits.shape[0]

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


def _row_value(name: str, value: RowParam, batch: int, device: torch.device, vocab: int) -> RowValue:
    spec = PARAMS[name]
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"{name} must be a scalar or a [{batch}] tensor, got shape {tuple(value.shape)}")
        if value.dtype == torch.bool:  # as a Python bool: a mask is not a parameter
            raise TypeError(f"{name} must be a number tensor, got torch.bool")
        if spec.integral and value.is_floating_point():
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        if name == "top_k" and value.dtype != torch.int32:  # narrowed to int32 it would wrap (2**32 + 3 -> 3);
            value = value.to(torch.int64).clamp(0, vocab)  # k <= 0 and k >= V mean off, as for a scalar
        return RowValue(None, value.to(device=device, dtype=spec.dtype))  # a no-op when both already match
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if spec.integral:
        if isinstance(value, float) and not value.is_integer():  # float(int) could overflow: ints pass as they are
            raise ValueError(f"{name} must be an integer, got {value}")
        value = int(value)
        if name == "top_k":  # k <= 0 and k >= V both mean off: the same sampler, and it fits int32
            return RowValue(min(max(value, 0), vocab), None)
        if not INT64[0] <= value <= INT64[1]:
            raise ValueError(f"{name} must fit in int64, got {value}")
        return RowValue(value, None)
    if not abs(value) <= FLOAT32_MAX:  # the kernels take float32: 1e39 would become inf
        raise ValueError(f"{name} must be finite in float32, got {value}")
    if not spec.lo <= value <= spec.hi:
        raise ValueError(f"{name} must be in [{spec.lo}, {spec.hi}], got {value}")
    return RowValue(float(value), None)


def _numbers(value: object) -> list[float] | None:
    """[value] for a real number, the numbers of an iterable of them (a list, a numpy array), else None
    (a bool or a string is not a weight, though float() would take it)."""
    def real(x: object) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool)

    if real(value):
        return [float(value)]
    if isinstance(value, (str, bytes, bool)) or not hasattr(value, "__iter__"):
        return None
    items = list(value)
    return [float(x) for x in items] if all(map(real, items)) else None


def _weights(weights: Union[Scalar, Sequence[Scalar], torch.Tensor], batch: int, pairs: int,
             device: torch.device) -> torch.Tensor:
    if isinstance(weights, torch.Tensor):
        if weights.dtype == torch.bool:
            raise TypeError("weights must be a number tensor, got torch.bool")
        w = weights.to(device=device, dtype=torch.float32)
        if w.dim() == 0:
            return w.reshape(1, 1).expand(batch, pairs)
        if w.dim() == 1 and w.shape[0] == pairs:
            return w[None, :].expand(batch, pairs)
        if w.dim() == 2 and tuple(w.shape) == (batch, pairs):
            return w
        raise ValueError(f"weights tensor must have shape [], [{pairs}] or [{batch}, {pairs}], got {tuple(w.shape)}")
    values = _numbers(weights)
    if values is None:
        raise TypeError(f"weights must be a number, a sequence of numbers or a tensor, got {weights!r}")
    if isinstance(weights, numbers.Real):
        values = values * pairs
    elif len(values) != pairs:
        raise ValueError(f"got {len(values)} weights for {pairs} delta pairs")
    if not all(abs(x) <= FLOAT32_MAX for x in values):  # also false for NaN
        raise ValueError(f"weights must be finite in float32, got {values}")
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
    batch, device = logits.shape[0], logits.device  # not int(): torch.export keeps a dynamic batch symbolic
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
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, offset=offset)
    return SamplingBatch(logits=logits, rl=rl, base=base, weights=_weights(weights, batch, len(rl), device),
                         params={name: _row_value(name, v, batch, device, vocab) for name, v in given.items()},
                         vocab=vocab)
