"""A decoder layer's feed-forward block: the dense gated MLP, or a sparse mixture of experts (Qwen3-MoE,
Qwen2-MoE, Mixtral, OLMoE) as HF's sparse MoE blocks compute it:

- the router: logits = gate(x) in the model dtype, softmax in float32, the top-k experts, their
  probabilities renormalised to sum to 1 where the config says so, then passed to the experts in the
  model dtype (Mixtral: in float32) (LayerOps.moe_route: rast_kernels.moe_routing's one kernel on CUDA,
  HF's ops in torch on the CPU);
- the experts: LayerOps.fused_moe (rast_kernels.moe: Triton on CUDA, HF's loop in torch on the CPU);
- Qwen2-MoE's shared expert, a dense MLP scaled by sigmoid(shared_expert_gate(x)), added last.

The experts' weights are two 2-D parameters, gate_up [E·2I, H] (expert e's gate rows, then its up rows)
and down [E·H, I], so the loader fills each checkpoint tensor into a run of rows as it fills the fused
dense projections; forward views them as [E, 2I, H] and [E, H, I]. With quantization="fp8" they are FP8
buffers with a float32 scale per output channel instead (``use_fp8_experts``, models/fp8.py), which the
kernels read as rast_kernels.fp8_linear reads its weights. Stacked small models (models.stacked)
are one SparseMoE over all their experts, each model's rows routed among its own. No host sync, so it
captures into a CUDA graph.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from rast_engine.models.blocks import MLP
from rast_engine.models.config import ModelConfig
from rast_engine.models.layer_ops import LayerOps
from rast_kernels.moe import fused_moe

WeightSlot = tuple[torch.Tensor, int, int]  # (parameter, first row, rows) an HF tensor fills
# the checkpoint's names: (block, router, expert gate, up, down)
MOE_NAMES = {"mixtral": ("block_sparse_moe", "gate", "w1", "w3", "w2"),
             "qwen": ("mlp", "gate", "gate_proj", "up_proj", "down_proj")}


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: LayerOps, gate: Optional[nn.Module] = None,
                 experts: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                 shared: Optional[tuple[MLP, nn.Module]] = None, copies: int = 1) -> None:
        """The router ``gate`` defaults to nn.Linear, the ``experts`` (gate_up, down) to new parameters and
        Qwen2-MoE's ``shared`` (expert, gate) to an MLP and nn.Linear; models.stacked passes stacked ones
        for ``copies`` models, whose rows come in ``copies`` equal groups, group g routed among its own
        model's experts (g·E .. g·E + E − 1 of the stacked ones)."""
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.hidden, self.inter, self.top_k = e, h, i, cfg.experts_per_token
        self.norm_topk_prob, self.router_fp32, self.ops, self.copies = cfg.norm_topk_prob, cfg.router_fp32, ops, copies
        self.names = MOE_NAMES["mixtral" if cfg.arch == "mistral" else "qwen"]
        self.gate = gate if gate is not None else nn.Linear(h, e, bias=False)
        if experts is None:
            experts = nn.Parameter(torch.empty(e * 2 * i, h)), nn.Parameter(torch.empty(e * h, i))
        self.experts_gate_up, self.experts_down = experts
        size = cfg.shared_expert_intermediate_size
        if size and shared is None:
            shared = (MLP(cfg, ops, nn.Linear(h, 2 * size, bias=False), nn.Linear(size, h, bias=False)),
                      nn.Linear(h, 1, bias=False))
        self.shared_expert, self.shared_expert_gate = shared if shared is not None else (None, None)
        self.fp8_experts: Optional[nn.ModuleList] = None  # (gate_up, down) storage of quantization="fp8"

    def use_fp8_experts(self, storage: Callable[[int, int], nn.Module]) -> None:
        """Keep the experts in FP8: ``storage(in, out)`` gives a module with an FP8 ``weight`` [out, in], float32
        ``scale`` [out] and ``load_rows`` (models/fp8.Fp8Linear, used as storage only); on the meta device."""
        e, h, i = self.num_experts, self.hidden, self.inter
        del self.experts_gate_up, self.experts_down
        self.fp8_experts = nn.ModuleList([storage(h, e * 2 * i), storage(i, e * h)])

    def _stores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensors the loader fills: the experts' gate_up [E·2I, H] and down [E·H, I] rows."""
        if self.fp8_experts is None:
            return self.experts_gate_up, self.experts_down
        return self.fp8_experts[0].weight, self.fp8_experts[1].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.ops.moe_route(self.gate(x), self.top_k, self.norm_topk_prob,
                                          torch.float32 if self.router_fp32 else x.dtype)
        if self.copies > 1:  # group g's rows route among the stacked experts of model g
            offsets = torch.arange(self.copies, device=x.device) * self.num_experts
            ids = ids + offsets.repeat_interleave(x.shape[0] // self.copies)[:, None]
        n = self.copies * self.num_experts
        gate_up, down = self._stores()
        gate_up, down = gate_up.view(n, 2 * self.inter, self.hidden), down.view(n, self.hidden, self.inter)
        if self.fp8_experts is None:
            out = self.ops.fused_moe(x, gate_up, down, ids, weights)
        else:  # on the backend the loader chose for FP8 weights (models/fp8.py), as an Fp8Linear runs
            fp8_gate_up, fp8_down = self.fp8_experts
            out = fused_moe(x, gate_up, down, ids, weights, fp8_gate_up.backend, fp8_gate_up.scale.view(n, -1),
                            fp8_down.scale.view(n, -1))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def weight_slots(self, prefix: str) -> dict[str, WeightSlot]:
        """HF tensor name -> where it goes, for the block of the layer whose names start with ``prefix``."""
        block, router, gate, up, down = self.names
        h, i = self.hidden, self.inter
        pre = f"{prefix}{block}."
        slots = {pre + f"{router}.weight": (self.gate.weight, 0, self.num_experts)}
        gate_up, down_rows = self._stores()
        for e in range(self.num_experts):
            expert = pre + f"experts.{e}."
            slots[expert + f"{gate}.weight"] = (gate_up, 2 * i * e, i)
            slots[expert + f"{up}.weight"] = (gate_up, 2 * i * e + i, i)
            slots[expert + f"{down}.weight"] = (down_rows, h * e, h)
        if self.shared_expert is not None:
            shared = self.shared_expert.down_proj.in_features
            slots[pre + "shared_expert.gate_proj.weight"] = (self.shared_expert.gate_up_proj.weight, 0, shared)
            slots[pre + "shared_expert.up_proj.weight"] = (self.shared_expert.gate_up_proj.weight, shared, shared)
            slots[pre + "shared_expert.down_proj.weight"] = (self.shared_expert.down_proj.weight, 0, h)
            slots[pre + "shared_expert_gate.weight"] = (self.shared_expert_gate.weight, 0, 1)
        return slots


def feed_forward(cfg: ModelConfig, ops: LayerOps, layer: int) -> MLP | SparseMoE:
    """Layer ``layer``'s block: sparse where cfg.moe_layers marks it, else the dense MLP."""
    return SparseMoE(cfg, ops) if cfg.num_experts and cfg.moe_layers[layer] else MLP(cfg, ops)
