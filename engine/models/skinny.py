"""decode_linear="skinny": the large model's plain linear layers (its projections, lm_head) run
rast_kernels.skinny_linear at up to MAX_ROWS rows, the decode steps of batch 1 to 4, and F.linear otherwise.

The swap changes each module's class and nothing else: the weights stay the nn.Linear parameters they
were, so loading, load_weights, sleep/wake_up and the CUDA graphs see the same tensors. Layers that are not
plain nn.Linear (FP8, LoRA, stacked small models) are left as they are. An opt-in until bench/gemm.py's
skinny rows and bench/decode.py --decode-linear skinny show it faster than cuBLAS on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rast_kernels.launch import interpreting
from rast_kernels.skinny_linear import MAX_ROWS, skinny_linear


class SkinnyLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (x.is_cuda or interpreting()) and 0 < rows <= MAX_ROWS and x.dtype == self.weight.dtype:
            return skinny_linear(x.reshape(rows, x.shape[-1]), self.weight, self.bias).reshape(
                *x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def use_skinny_linears(model: nn.Module) -> int:
    """Every plain nn.Linear of ``model`` made a SkinnyLinear, in place; how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SkinnyLinear
            swapped += 1
    return swapped
