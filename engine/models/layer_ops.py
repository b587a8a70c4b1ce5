"""The decoder's elementwise work (RMSNorm with its residual add, rotary embedding, SiLU-and-multiply or
Gemma's GELU-tanh-and-multiply) behind one small interface, so the model has a single code path:

- "torch": HF transformers' formulas in plain PyTorch, about 35 small kernels per layer; the CPU default.
  A mixture of experts loops over the experts as HF's does (over every expert on CUDA, so no host sync).
- "triton": rast_kernels.layer_ops, four fused kernels per layer with HF's roundings (six where OLMo
  norms q and k over all heads or Gemma norms each sublayer's output too), the rotary one
  also norming each head first (Qwen3) and writing this step's k/v into the paged cache
  (``stores_kv``), and a mixture of experts' routing in two and its experts in three (rast_kernels.moe);
  the CUDA default, where at small
  batch the unfused kernels' launch latency would rival the weight reads.

Both return new tensors and never write their inputs (rotary_store_kv writes only the cache slots of
this step's tokens), so either can run inside a CUDA graph capture.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F

from rast_engine.config import LAYER_OPS
from rast_engine.errors import RastError
from rast_kernels.layer_ops_checks import QKNorm
from rast_kernels.moe import fused_moe, fused_moe_torch
from rast_kernels.moe_routing import moe_route, moe_route_torch


class LayerOps(Protocol):
    name: str
    # True: the layer calls rotary_store_kv and then only the attention backend's ``attend``;
    # False: rotary, then the backend's ``forward`` (which stores k/v itself)
    stores_kv: bool

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """weight * x / rms(x): statistics in float32, the product in x's dtype. weight [G, N]: x holds G
        models' rows, G equal consecutive groups, group g taking weight[g] (a stacked forward)."""
        ...

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """s = residual + x (in x's dtype) -> (rms_norm(s), s)."""
        ...

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor,
               qk_norm: Optional[QKNorm] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate-half RoPE of q [T, Hq, D] and k [T, Hk, D]; cos_sin is [positions, D] = [cos | sin].
        ``qk_norm``: first rms_norm each head (rows of D) with the q or k weight ([D] or [G, D])."""
        ...

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2N] = [gate | up] -> silu(gate) * up."""
        ...

    def gelu_tanh_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2N] = [gate | up] -> gelu(gate, approximate="tanh") * up (Gemma)."""
        ...

    def moe_route(self, logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits [T, E] -> (expert ids [T, k], their weights [T, k] in ``dtype``), as HF's routers
        give them: rast_kernels.moe_routing."""
        ...

    def fused_moe(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H] through each token's routed experts (gate_up [E, 2I, H], down [E, H, I]), weighted and
        summed: rast_kernels.moe (FP8 experts take the backend the loader chose for FP8 weights instead)."""
        ...


class KVStoringLayerOps(LayerOps, Protocol):
    def rotary_store_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, qk_norm: Optional[QKNorm] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """rotary(q, k), with the rotated k and v written into the paged caches at slot_mapping (-1 skipped)."""
        ...


class TorchLayerOps:
    name = "torch"
    stores_kv = False  # a pure-torch store that skips slot -1 needs a host sync; the backend stores

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        if weight.dim() == 2:
            return (weight[:, None] * y.view(weight.shape[0], -1, y.shape[-1])).view_as(y)
        return weight * y

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        s = residual + x
        return self.rms_norm(s, weight, eps), s

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor,
               qk_norm: Optional[QKNorm] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if qk_norm is not None:
            wq, wk, eps = qk_norm
            q = self.rms_norm(q.reshape(-1, q.shape[-1]), wq, eps).view(q.shape)
            k = self.rms_norm(k.reshape(-1, k.shape[-1]), wk, eps).view(k.shape)
        cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2] each
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def gelu_tanh_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up

    def moe_route(self, logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        return moe_route_torch(logits, top_k, renormalize, dtype)

    def fused_moe(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor) -> torch.Tensor:
        return fused_moe_torch(x, gate_up, down, topk_ids, topk_weights)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class TritonLayerOps:
    name = "triton"
    stores_kv = True

    def __init__(self) -> None:
        from rast_kernels import layer_ops

        self._k = layer_ops

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._k.rms_norm(x, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._k.add_rms_norm(x, residual, weight, eps)

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor,
               qk_norm: Optional[QKNorm] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._k.rotary_embedding(positions, q, k, cos_sin, qk_norm)

    def rotary_store_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, qk_norm: Optional[QKNorm] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._k.rotary_embedding_store_kv(positions, q, k, v, cos_sin, k_cache, v_cache, slot_mapping,
                                                 qk_norm)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._k.silu_and_mul(gate_up)

    def gelu_tanh_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._k.gelu_tanh_and_mul(gate_up)

    def moe_route(self, logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        return moe_route(logits, top_k, renormalize, dtype)

    def fused_moe(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor) -> torch.Tensor:
        return fused_moe(x, gate_up, down, topk_ids, topk_weights)


def get_layer_ops(name: str, device: torch.device | str) -> LayerOps:
    """"auto": triton on CUDA, torch elsewhere. "triton" on a CPU needs TRITON_INTERPRET=1 (tests)."""
    if name not in LAYER_OPS:
        raise RastError(f"layer_ops must be one of {LAYER_OPS}, got {name!r}")
    if name == "auto":
        name = "triton" if torch.device(device).type == "cuda" else "torch"
    if name == "torch":
        return TorchLayerOps()
    from rast_kernels.launch import interpreting

    if torch.device(device).type != "cuda" and not interpreting():
        raise RastError(f"layer_ops='triton' needs a CUDA device (or TRITON_INTERPRET=1), got {device}")
    return TritonLayerOps()
