"""One sparse layer's routing and experts (rast_kernels.moe_routing, rast_kernels.moe) from its router
logits, at decode and prefill token counts, against the floor of reading the experts its tokens route to
once.

A mixture of experts at decode reads only the experts its tokens route to: Qwen3-30B-A3B's layer holds
128 experts of 3 · 2048 · 768 weights and one token reads 8 of them (75 MB of 1.2 GB in bf16). The floor of
a call is the bytes of the distinct experts its routing names (counted from the ids, not estimated) over
the measured copy bandwidth. Routing: a random router's softmax, top-k, renormalised (Qwen3's), so near
uniform. Impls, side by side, each from the router logits (the router's GEMM is not timed):
- fused: moe_route, align and the three expert kernels (five launches), timed as CUDA-graph replays;
- fused-fp8: the same over FP8 experts (quantization="fp8"), whose floor is about half the bytes;
- torch-routed: HF's router and its loop over the routed experts (reads the ids on the host each call);
- torch-all: HF's router and the sync-free loop the torch layer ops run on CUDA (every expert, every token).
Two layers' weights alternate in each timed call, so replays never find the experts in L2.

    python bench/moe.py [--out DIR]     # CUDA: Qwen3-30B-A3B's experts at 1, 8, 32, 128, 512 tokens
    python bench/moe.py --quick         # CPU smoke run: tiny shapes, the Triton path interpreted if
                                        # TRITON_INTERPRET=1, the times mean nothing
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (copy_bandwidth, device_name, git_sha, graph_time_ms, keeps_results, quick_args,  # noqa: E402
                          table, time_us, write_results)
from rast_engine.models.config import ModelConfig  # noqa: E402
from rast_kernels.fp8_linear import quantize_fp8  # noqa: E402
from rast_kernels.launch import interpreting  # noqa: E402
from rast_kernels.moe import fused_moe, fused_moe_torch  # noqa: E402
from rast_kernels.moe_routing import moe_route, moe_route_torch  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
TINY = {"model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128}


def layer_weights(m: ModelConfig, dtype: torch.dtype, device: torch.device, layers: int
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(gate_up [E, 2I, H], down [E, H, I]) of ``layers`` layers, drawn on the device (never zeros)."""
    e, h, i = m.num_experts, m.hidden_size, m.moe_intermediate_size
    g = torch.Generator(device=device).manual_seed(e * h * i)
    return [(torch.randn(e, 2 * i, h, generator=g, device=device, dtype=dtype).mul_(h ** -0.5),
             torch.randn(e, h, i, generator=g, device=device, dtype=dtype).mul_(i ** -0.5)) for _ in range(layers)]


def quantized(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts [E, out, in] -> (FP8 weights, float32 scales [E, out]), as quantization="fp8" stores them."""
    parts = [quantize_fp8(e) for e in w]
    return torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])


def router_logits(m: ModelConfig, tokens: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(tokens)
    return torch.randn(tokens, m.num_experts, generator=g, device=device).to(dtype)


def main() -> None:
    args = quick_args(__doc__, "tiny shapes on the CPU (automatic without CUDA)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    quick = device.type != "cuda"
    name, cfg = ("tiny", TINY) if quick else ("qwen3-30b-a3b",
                                              json.loads((CONFIGS / "qwen3-30b-a3b.json").read_text()))
    m = ModelConfig.from_dict(cfg)
    dtype = torch.float32 if quick else torch.bfloat16
    token_counts, iters = ([1, 4], 2) if quick else ([1, 8, 32, 128, 512], 20)
    layers = layer_weights(m, dtype, device, 1 if quick else 2)
    h, i = m.hidden_size, m.moe_intermediate_size
    # an expert's bytes: its weights in the dtype, or FP8 weights and a float32 scale per output channel
    expert_bytes = {"fp": 3 * h * i * torch.finfo(dtype).bits // 8, "fp8": 3 * h * i + 4 * (2 * i + h)}
    fp8_layers = [tuple(quantized(w) for w in layer) for layer in layers]
    impls = ["torch-routed", "torch-all"] + (["fused", "fused-fp8"] if device.type == "cuda" or interpreting() else [])
    bandwidth = copy_bandwidth(device)
    rows = []
    k, renorm = m.experts_per_token, m.norm_topk_prob
    for tokens in token_counts:
        logits = router_logits(m, tokens, dtype, device)
        ids = moe_route_torch(logits, k, renorm, dtype)[0]
        x = torch.randn(tokens, m.hidden_size, device=device, dtype=dtype)
        def fused() -> list[torch.Tensor]:  # each layer routes its own tokens
            return [fused_moe(x, gu, dn, *moe_route(logits, k, renorm, dtype)) for gu, dn in layers]

        def fused_fp8() -> list[torch.Tensor]:
            return [fused_moe(x, gu[0], dn[0], *moe_route(logits, k, renorm, dtype), gate_up_scale=gu[1],
                              down_scale=dn[1]) for gu, dn in fp8_layers]

        def torch_loop(every: bool) -> list[torch.Tensor]:
            return [fused_moe_torch(x, gu, dn, *moe_route_torch(logits, k, renorm, dtype), sync_free=every)
                    for gu, dn in layers]

        for impl in impls:
            floor_bytes = ids.unique().numel() * expert_bytes["fp8" if impl == "fused-fp8" else "fp"] * len(layers)
            if impl.startswith("fused"):
                ms = graph_time_ms(fused if impl == "fused" else fused_fp8, device, iters)
            else:
                ms = time_us(lambda: torch_loop(impl == "torch-all"), device, warmup=1, iters=iters) / 1e3
            us = ms * 1e3 / len(layers)
            floor_us = floor_bytes / len(layers) / bandwidth * 1e6
            rows.append(dict(model=name, impl=impl, tokens=tokens, experts_read=ids.unique().numel(),
                             us=round(us, 2), floor_us=round(floor_us, 2),
                             gbs=round(floor_bytes / len(layers) / (us * 1e-6) / 1e9, 1),
                             frac_of_copy=round(floor_us / us, 3)))
            print(table([rows[-1]], list(rows[-1])), flush=True)
    print(f"moe experts | device: {device_name(device)} | commit: {git_sha()} | {dtype} | copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s{' | CPU smoke run: the times mean nothing' if quick else ''}")
    print(table(rows, list(rows[0])))
    if keeps_results(args.out, device, quick):
        path = write_results("moe", device, rows, dict(dtype=str(dtype), copy_gbs=round(bandwidth / 1e9, 1),
                                                       experts=m.num_experts, experts_per_token=m.experts_per_token),
                             args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
