"""The decode step's projections alone: each linear layer of a real checkpoint's shape at a few tokens,
as the engine runs it (F.linear for a model, torch.bmm over stacked weights for the small (rl, base)
pair), against the floor of reading its weights once.

At decode batch sizes a projection reads its whole weight to make a few rows, so its floor is the weight
bytes over the measured copy bandwidth. The first H100 run (8759dcb) put the 7B base decode step at
10.2 ms against a 4.7 ms roofline, 3.8 ms of it in the sampler's fallback; this suite says how much of
the rest the GEMMs leave on the table, layer by layer. Timed as CUDA-graph replays of one call
(bench.common.graph_time_ms) with the weights rotated among enough copies to exceed the L2 cache, so
every replay reads from HBM. A single model's decoder projections are also timed as the engine runs them
with quantization="fp8" (impl fp8: rast_kernels.fp8_linear's Triton kernel over FP8 weights, whose
floor is half the bytes; the torch spec on a CPU smoke run), and at up to four tokens as
decode_linear="skinny" runs them (impl skinny: rast_kernels.skinny_linear, interpreted on a CPU smoke run).

    python bench/gemm.py [--out DIR]    # CUDA: Qwen2.5-7B, 1.5B (stacked pair), 14B at 1, 8, 32, 128 tokens
    python bench/gemm.py --quick        # CPU smoke run: tiny shapes, the times mean nothing
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (copy_bandwidth, device_name, git_sha, graph_time_ms, quick_args, table,  # noqa: E402
                          write_results)
from rast_engine.models.config import ModelConfig  # noqa: E402
from rast_kernels.fp8_linear import fp8_linear, quantize_fp8  # noqa: E402
from rast_kernels.launch import interpreting  # noqa: E402
from rast_kernels.skinny_linear import MAX_ROWS, skinny_linear  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
L2_BYTES = 64 * 2**20  # above an H100's 50 MB and an H200's 60 MB: rotated copies never all fit


def projections(cfg: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of a decoder layer, merged as the engine merges them, and lm_head."""
    m = ModelConfig.from_dict(cfg)
    hidden, inter = m.hidden_size, m.intermediate_size
    return {"qkv": (hidden, m.q_size + 2 * m.kv_size), "o": (m.q_size, hidden),
            "gate_up": (hidden, 2 * inter), "down": (inter, hidden), "lm_head": (hidden, m.vocab_size)}


def weights_for(n_in: int, n_out: int, stacked: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Copies of one projection's [stacked, out, in] weight, enough to exceed L2 together on a GPU, drawn on
    the device itself (a host generator would take minutes for the 14B's); never zeros, which can run faster
    than real data."""
    weight_bytes = stacked * n_in * n_out * torch.finfo(dtype).bits // 8
    copies = max(2, -(-2 * L2_BYTES // weight_bytes)) if device.type == "cuda" else 1
    g = torch.Generator(device=device).manual_seed(n_in * n_out)
    return [torch.randn(stacked, n_out, n_in, generator=g, device=device, dtype=dtype).mul_(n_in**-0.5)
            for _ in range(copies)]


def timed(weights: list[torch.Tensor], tokens: int, iters: int) -> float:
    """Milliseconds per call: F.linear (one model) or one bmm over the stacked models' weights."""
    stacked, _, n_in = weights[0].shape
    w0 = weights[0]
    x = torch.randn(stacked, tokens, n_in, device=w0.device, dtype=w0.dtype)

    def call() -> list[torch.Tensor]:  # one captured GEMM per copy: a replay reads each weight once
        return [F.linear(x[0], w[0]) if stacked == 1 else torch.bmm(x, w.transpose(1, 2)) for w in weights]

    return graph_time_ms(call, w0.device, iters) / len(weights)


def timed_fp8(weights: list[torch.Tensor], tokens: int, iters: int) -> float:
    """Milliseconds per fp8_linear call over the FP8 quantisation of each copy of one model's weight."""
    n_in, w0 = weights[0].shape[2], weights[0]
    quantised = [quantize_fp8(w[0]) for w in weights]
    x = torch.randn(tokens, n_in, device=w0.device, dtype=w0.dtype)
    backend = "triton" if w0.is_cuda else "torch"

    def call() -> list[torch.Tensor]:
        return [fp8_linear(x, w8, scale, backend=backend) for w8, scale in quantised]

    return graph_time_ms(call, w0.device, iters) / len(weights)


def timed_skinny(weights: list[torch.Tensor], tokens: int, iters: int) -> float:
    """Milliseconds per rast_kernels.skinny_linear call (a few rows) over each copy of one model's weight."""
    n_in, w0 = weights[0].shape[2], weights[0]
    x = torch.randn(tokens, n_in, device=w0.device, dtype=w0.dtype)

    def call() -> list[torch.Tensor]:
        return [skinny_linear(x, w[0]) for w in weights]

    return graph_time_ms(call, w0.device, iters) / len(weights)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


def main() -> None:
    args = quick_args(__doc__, "tiny shapes on the CPU (automatic without CUDA)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    quick = device.type != "cuda"
    dtype = torch.bfloat16 if not quick else torch.float32
    if quick:
        models = {"tiny": ({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "num_hidden_layers": 1, "intermediate_size": 128,
                            "vocab_size": 512}, 1)}
        token_counts, iters = [1, 4], 2
    else:
        models = {name: (json.loads((CONFIGS / f"{name}.json").read_text()), stacked)
                  for name, stacked in (("qwen2.5-7b", 1), ("qwen2.5-1.5b", 2), ("qwen2.5-14b", 1))}
        token_counts, iters = [1, 8, 32, 128], 20
    bandwidth = copy_bandwidth(device)
    rows = []
    for name, (cfg, stacked) in models.items():
        for proj, (n_in, n_out) in projections(cfg).items():
            weights = weights_for(n_in, n_out, stacked, dtype, device)
            impls = {dtype_name(dtype): (timed, stacked * n_in * n_out * torch.finfo(dtype).bits // 8)}
            if stacked == 1 and proj != "lm_head":  # what quantization="fp8" swaps in (engine/models/fp8.py)
                impls["fp8"] = (timed_fp8, n_in * n_out + 4 * n_out)
            if stacked == 1 and (device.type == "cuda" or interpreting()):  # decode_linear="skinny"'s kernel
                impls["skinny"] = (timed_skinny, impls[dtype_name(dtype)][1])
            for impl, (timer, weight_bytes) in impls.items():
                for tokens in token_counts:
                    if impl == "skinny" and tokens > MAX_ROWS:
                        continue
                    ms = timer(weights, tokens, iters)
                    floor_us = weight_bytes / bandwidth * 1e6
                    rows.append(dict(model=name, stacked=stacked, proj=proj, impl=impl, n_in=n_in, n_out=n_out,
                                     tokens=tokens, us=round(ms * 1e3, 2), floor_us=round(floor_us, 2),
                                     gbs=round(weight_bytes / (ms * 1e-3) / 1e9, 1),
                                     frac_of_copy=round(floor_us / (ms * 1e3), 3)))
                    print(table([rows[-1]], list(rows[-1])), flush=True)
            del weights  # before the next projection's: the 14B's lm_head copies alone take 3 GB
        if not quick:  # rewritten after every model, so a stage's time limit keeps what it measured
            write_results("gemm", device, rows, dict(partial=True), args.out)
    print(f"decode projections | device: {device_name(device)} | commit: {git_sha()} | {dtype} | copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s{' | CPU smoke run: the times mean nothing' if quick else ''}")
    print(table(rows, list(rows[0])))
    if args.out is not None or not quick:
        path = write_results("gemm", device, rows, dict(dtype=str(dtype), copy_gbs=round(bandwidth / 1e9, 1)),
                             args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
