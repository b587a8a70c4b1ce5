"""Argument checks of rast_kernels.layer_ops' launchers: shapes, strides, dtypes and devices, so a bad call
fails with a message on the host instead of reading out of bounds on the device."""
from __future__ import annotations

import torch

from rast_kernels.launch import require_launchable

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_rows(name: str, x: torch.Tensor, width: int | None = None) -> None:
    require_launchable(x, "rast_kernels.layer_ops")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [tokens, features], got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous along its last dimension")
    if width is not None and x.shape[1] != width:
        raise ValueError(f"{name} has {x.shape[1]} features, expected {width}")


def check_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor) -> None:
    require_launchable(q, "rast_kernels.layer_ops")
    if not (k.device == positions.device == cos_sin.device == q.device):
        raise ValueError(f"q, k, positions and cos_sin must share one device, got {q.device}, {k.device}, "
                         f"{positions.device}, {cos_sin.device}")
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must be [T, heads, head_dim] with equal T and head_dim, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    t, dim = q.shape[0], q.shape[2]
    if dim % 2 or q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("head_dim must be even and contiguous in q and k")
    if q.dtype != k.dtype or cos_sin.dtype != q.dtype or q.dtype not in DTYPES:
        raise TypeError(f"q, k and cos_sin must share one float dtype, got {q.dtype}, {k.dtype}, {cos_sin.dtype}")
    if cos_sin.dim() != 2 or cos_sin.shape[1] != dim or cos_sin.stride(1) != 1:
        raise ValueError(f"cos_sin must be [positions, {dim}] contiguous, got {tuple(cos_sin.shape)}")
    if positions.shape != (t,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int [{t}], got {tuple(positions.shape)} {positions.dtype}")


def check_store(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    if v.shape != k.shape or v.dtype != k.dtype or v.device != k.device or v.stride(2) != 1:
        raise ValueError(f"v must match k in shape, dtype and device, contiguous along head_dim; got "
                         f"{tuple(v.shape)} {v.dtype} on {v.device} for k {tuple(k.shape)} {k.dtype}")
    if (k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride()
            or k_cache.shape[2:] != k.shape[1:] or k_cache.stride(3) != 1):
        raise ValueError(f"k_cache/v_cache must be equal-strided [num_blocks, block_size, {k.shape[1]}, "
                         f"{k.shape[2]}] contiguous along head_dim, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if (k_cache.dtype not in (k.dtype, torch.float8_e4m3fn) or v_cache.dtype != k_cache.dtype
            or not (k_cache.device == v_cache.device == k.device)):
        raise TypeError(f"the caches must have k's dtype (or float8_e4m3fn, both) and device, got {k_cache.dtype} on "
                        f"{k_cache.device} and {v_cache.dtype} on {v_cache.device}")
    if (slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int32, torch.int64)
            or slot_mapping.device != k.device):
        raise ValueError(f"slot_mapping must be int [{k.shape[0]}] on {k.device}, got "
                         f"{tuple(slot_mapping.shape)} {slot_mapping.dtype} on {slot_mapping.device}")


QKNorm = tuple[torch.Tensor, torch.Tensor, float]  # (q weight, k weight, eps) of Qwen3's per-head RMSNorm


def check_qk_norm(q: torch.Tensor, qk_norm: QKNorm | None) -> None:
    if qk_norm is None:
        return
    t, dim = q.shape[0], q.shape[2]
    for w in qk_norm[:2]:
        if (w.dim() not in (1, 2) or w.shape[-1] != dim or w.dtype != q.dtype or w.device != q.device
                or w.stride(-1) != 1 or (w.dim() == 2 and t % w.shape[0])):
            raise ValueError(f"q/k norm weights must be [{dim}] or [G, {dim}] (G dividing the {t} tokens), "
                             f"contiguous, of q's dtype and device; got {tuple(w.shape)} {w.dtype} on {w.device}")
    if qk_norm[0].shape != qk_norm[1].shape or qk_norm[0].stride() != qk_norm[1].stride():
        raise ValueError(f"the q and k norm weights differ in shape or strides (the kernel reads both with "
                         f"one row stride): {tuple(qk_norm[0].shape)} {qk_norm[0].stride()} and "
                         f"{tuple(qk_norm[1].shape)} {qk_norm[1].stride()}")
