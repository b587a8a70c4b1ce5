"""Rotary position embedding (rotate-half convention, as the HF Qwen2 and Llama checkpoints expect), with
llama3, yarn or linear scaling.

The cos/sin table is computed once in float32 for every position the model serves (ModelConfig.max_context)
and then stored in the model dtype, so a step only gathers rows by position: no host sync, graph-capturable.
The rotation itself is the LayerOps backend's (plain torch, or one fused Triton kernel for q and k that
can also write k and v into the paged KV cache).
"""
from __future__ import annotations

import math
from typing import Any, Optional, cast

import torch
from torch import nn

from rast_engine.models.layer_ops import KVStoringLayerOps, LayerOps, QKNorm


def frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int
                ) -> tuple[torch.Tensor, float]:
    """([head_dim // 2] float32 inverse frequencies, the factor cos and sin are scaled by), with the
    checkpoint's rope scaling (ModelConfig.rope_scaling: llama3, yarn or linear) applied, as HF's
    modeling_rope_utils computes them."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    kind = None if scaling is None else scaling["rope_type"]
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "yarn":
        return _yarn(inv_freq, head_dim, theta, scaling, max_positions)
    return inv_freq, 1.0


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: wavelengths shorter than old_ctx/high_freq_factor are kept, longer than
    old_ctx/low_freq_factor are stretched by `factor`, and the band between interpolates linearly in
    old_ctx/wavelength."""
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_ctx / low, inv_freq / factor, blended)
    return torch.where(wavelen < old_ctx / high, inv_freq, out)


def _yarn(inv_freq: torch.Tensor, head_dim: int, theta: float, s: dict[str, Any], max_positions: int
          ) -> tuple[torch.Tensor, float]:
    """YaRN (Qwen2.5's long-context recipe): the dimensions that turn fewer than beta_slow times over the
    original context are interpolated by `factor`, those turning more than beta_fast times are kept,
    with a linear ramp between; cos and sin are scaled by 0.1 ln(factor) + 1 (attention_factor, or the
    mscale ratio, when the checkpoint gives one)."""
    old_ctx = float(s["original_max_position_embeddings"])
    factor = float(s["factor"]) if s.get("factor") is not None else max_positions / old_ctx
    mscale = lambda m: 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0  # noqa: E731
    attention = s.get("attention_factor")
    if attention is None:
        attention = mscale(s["mscale"]) / mscale(s["mscale_all_dim"]) if s.get("mscale") and s.get("mscale_all_dim") \
            else mscale(1.0)
    fast, slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:  # the dimension turning `rotations` times over the old context
        return head_dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(fast), dim_of(slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low if high != low else 0.001)).clamp(0, 1)
    kept = 1 - ramp  # 1: extrapolated (kept), 0: interpolated
    return inv_freq / factor * (1 - kept) + inv_freq * kept, float(attention)


class RotaryEmbedding(nn.Module):
    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None,
        dtype: torch.dtype, ops: LayerOps,
    ) -> None:
        super().__init__()
        self.ops = ops
        self.head_dim, self.max_positions = head_dim, max_positions
        self.theta, self.scaling, self.dtype = theta, scaling, dtype
        # not persistent: rebuilt by reset_cache() after meta-device construction, never loaded
        self.register_buffer("cos_sin", torch.empty(max_positions, head_dim, dtype=dtype), persistent=False)
        if self.cos_sin.device.type != "meta":
            self.reset_cache()

    @torch.no_grad()
    def reset_cache(self) -> None:
        device = self.cos_sin.device
        inv_freq, attention = frequencies(self.head_dim, self.theta, self.scaling, self.max_positions)
        positions = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, inv_freq.to(device))  # float32, like the HF reference
        self.cos_sin = (torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention).to(self.dtype)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, qk_norm: Optional[QKNorm] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D], k: [T, Hkv, D], positions: [T] -> rotated (q, k), same shapes and dtype, each head
        RMS-normed first with ``qk_norm`` (Qwen3)."""
        return self.ops.rotary(positions, q, k, self.cos_sin, qk_norm)

    def forward_store_kv(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
        v_cache: torch.Tensor, slot_mapping: torch.Tensor, qk_norm: Optional[QKNorm] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward, with the rotated k and v written into the paged caches at slot_mapping: only for ops
        whose ``stores_kv`` is True."""
        ops = cast(KVStoringLayerOps, self.ops)
        return ops.rotary_store_kv(positions, q, k, v, self.cos_sin, k_cache, v_cache, slot_mapping, qk_norm)
