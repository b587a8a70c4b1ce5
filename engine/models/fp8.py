"""quantization="fp8": the large model's decoder projections (q/k/v, o, gate/up, down) stored as FP8
weights with one scale per output channel (rast_kernels.fp8_linear), quantised from the checkpoint as
it loads; in a mixture of experts, every expert's too (rast_kernels.moe reads them), while its router keeps
the model's dtype. Embeddings, norms and lm_head keep the model's dtype, as vLLM's fp8 keeps lm_head; so do the
small models, whose logit difference R − S is the signal RAST transfers: RL fine-tuning moves weights
by far less than e4m3's relative spacing (2^-3), so R and S would mostly round to the same FP8 values
and their difference to quantisation noise.

The swap happens on the meta device, before any weight exists, so a bf16 copy of the large model is
never allocated: the loader quantises each checkpoint tensor into its rows of the FP8 weight (fused
q/k/v and gate/up rows are independent output channels, so each part gets its own scales).
"""
from __future__ import annotations

import torch
from torch import nn

from rast_engine.models.moe import SparseMoE
from rast_kernels.fp8_linear import FP8, fp8_linear, quantize_fp8

QUANTIZE_ROWS = 4096  # rows quantised at a time: bounds the float32 temporary of a large projection


class Fp8Linear(nn.Module):
    """nn.Linear's interface over an FP8 weight [out, in] and float32 scales [out]; the bias (if any)
    in the model's dtype. ``backend``: rast_kernels.fp8_linear's, "triton" or "torch"."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, backend: str) -> None:
        super().__init__()
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.scale, self.bias, backend=self.backend)

    @torch.no_grad()
    def load_rows(self, start: int, source: torch.Tensor) -> None:
        """Quantise ``source`` [rows, in] into output channels start .. start + rows - 1."""
        for r in range(0, source.shape[0], QUANTIZE_ROWS):
            w8, scale = quantize_fp8(source[r:r + QUANTIZE_ROWS].to(self.weight.device))
            self.weight[start + r:start + r + w8.shape[0]].copy_(w8)
            self.scale[start + r:start + r + w8.shape[0]].copy_(scale)


def use_fp8(model: nn.Module, backend: str) -> None:
    """Swap every decoder layer's projections for Fp8Linear, in place (the model is on the meta device)."""
    for layer in model.layers:
        mlp = layer.mlp
        if isinstance(mlp, SparseMoE):  # its experts; the router keeps the model dtype, a shared expert is an MLP
            dtype = mlp.gate.weight.dtype
            mlp.use_fp8_experts(lambda n_in, n_out: Fp8Linear(n_in, n_out, False, dtype, backend))
            mlp = mlp.shared_expert
        owned = ((mlp, "gate_up_proj"), (mlp, "down_proj")) if mlp is not None else ()
        for owner, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"), *owned):
            linear: nn.Linear = getattr(owner, name)
            setattr(owner, name, Fp8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                                           linear.weight.dtype, backend))


def fp8_owners(model: nn.Module) -> dict[int, Fp8Linear]:
    """id(weight) -> its Fp8Linear, for the loader's tensor slots."""
    return {id(m.weight): m for m in model.modules() if isinstance(m, Fp8Linear)}
