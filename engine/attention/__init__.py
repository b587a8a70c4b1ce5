"""Attention backend selection. The GPU backends are imported lazily, only when chosen, so a CPU install
never imports Triton kernels or flash_attn."""
from __future__ import annotations

import importlib.util

import torch

from rast_engine.attention.base import AttentionBackend
from rast_engine.attention.metadata import AttentionMetadata
from rast_engine.errors import RastError

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]


def _flash_attn_importable() -> bool:
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:  # a wheel built for another torch/CUDA fails at import, not at find_spec
        return False
    return True


# flash-attn's paged kernels take cache blocks in multiples of this many tokens.
FLASH_BLOCK_MULTIPLE = 256


def get_attention_backend(name: str, device: torch.device | str, block_size: int,
                          kv_cache_dtype: str = "auto") -> AttentionBackend:
    """"auto": flash_attn if it imports on CUDA, the block size suits its paged kernels and the KV cache
    is in the model's dtype, else triton on CUDA, else torch."""
    device = torch.device(device)
    if name == "flash_attn" and kv_cache_dtype != "auto":
        raise RastError(f"attention_backend='flash_attn' reads a KV cache in the model's dtype only, not "
                        f"kv_cache_dtype={kv_cache_dtype!r}: use 'triton' (or 'auto')")
    if name == "auto":
        if device.type == "cuda":
            flash_ok = (block_size % FLASH_BLOCK_MULTIPLE == 0 and kv_cache_dtype == "auto"
                        and _flash_attn_importable())
            name = "flash_attn" if flash_ok else "triton"
        else:
            name = "torch"
    if name == "torch":
        from rast_engine.attention.torch_backend import TorchAttention

        return TorchAttention()
    if name == "triton":
        from rast_kernels.launch import interpreting

        if device.type != "cuda" and not interpreting():
            raise RastError(f"attention_backend='triton' needs a CUDA device, got {device} (on the CPU use "
                            "'torch'; TRITON_INTERPRET=1 runs the kernels interpreted, for tests)")
        from rast_engine.attention.triton_backend import TritonAttention

        return TritonAttention()
    if name == "flash_attn":
        if device.type != "cuda":
            raise RastError(f"attention_backend='flash_attn' needs a CUDA device, got {device}")
        if not _flash_attn_importable():
            raise RastError("attention_backend='flash_attn' but the flash_attn package does not import; "
                            "install the 'flash' extra or use 'triton'")
        if block_size % FLASH_BLOCK_MULTIPLE:
            raise RastError(f"attention_backend='flash_attn' needs block_size to be a multiple of "
                            f"{FLASH_BLOCK_MULTIPLE}, got {block_size}; use 'triton' or a larger block_size")
        from rast_engine.attention.flash_backend import FlashAttention

        return FlashAttention()
    raise RastError(f"unknown attention backend {name!r}; expected 'auto', 'torch', 'triton' or 'flash_attn'")
