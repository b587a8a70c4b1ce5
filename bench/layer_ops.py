"""Layer-ops benchmark: the fused Triton kernels of rast_kernels.layer_ops against the plain torch ops
they replace (the engine's two LayerOps backends), per op and for one decode layer's sequence
(add + RMSNorm, rotary + KV-cache store, add + RMSNorm, SiLU-and-multiply), at real model widths (Qwen3's
rotary norms each head of q and k first). The
torch side stores k/v with rast_kernels' store kernel, as the engine's Triton attention backend does;
the fused side writes them from its rotary kernel (``rotary_store``).

    python bench/layer_ops.py            # CUDA: table, and bench/results/layer-ops-<device>-<sha>.json
    python bench/layer_ops.py --quick    # CPU smoke test under TRITON_INTERPRET=1, tiny shapes

Timed as CUDA-graph replays (bench.common.graph_time_ms), as the engine's decode step runs them, so each
kernel's launch latency counts. Each row gives the bytes the op must move (its inputs read once, its
outputs written once), the floor (those bytes over the measured copy bandwidth) and the achieved GB/s.
At a few tokens the floor is far below a microsecond and the time is launch latency: kernels per layer
is then what matters, and the `layer` rows show it. Every configuration is first checked: fused and
torch outputs at most one unit of the dtype apart.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import torch

if "--quick" in sys.argv or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before rast_kernels decorates its kernels

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # rast_kernels from a bare checkout too
from bench.common import (copy_bandwidth, device_name, graph_time_ms, import_engine, quick_args, table,  # noqa: E402
                          write_results)

# (hidden, q heads, kv heads, head_dim, intermediate, per-head q/k norm), from bench/configs
SHAPES = {"qwen2.5-7b": (3584, 28, 4, 128, 18944, False), "qwen2.5-1.5b": (1536, 12, 2, 128, 8960, False),
          "qwen3-8b": (4096, 32, 8, 128, 12288, True)}
OPS = ("add_rms_norm", "rotary", "rotary_store", "silu_and_mul", "layer")
BLOCK = 16  # KV-cache block size


def make_inputs(tokens: int, shape: tuple, dtype: torch.dtype, device: torch.device) -> dict:
    hidden, hq, hk, dim, inter, qk_norm = shape
    g = torch.Generator().manual_seed(tokens)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g).to(dtype).to(device)

    qkv = rand(tokens, (hq + 2 * hk) * dim)
    blocks = tokens // BLOCK + 1
    return dict(x=rand(tokens, hidden), residual=rand(tokens, hidden), weight=rand(hidden).abs() + 0.5,
                q=qkv[:, :hq * dim].view(tokens, hq, dim), k=qkv[:, hq * dim:(hq + hk) * dim].view(tokens, hk, dim),
                v=qkv[:, (hq + hk) * dim:].view(tokens, hk, dim),
                positions=torch.randint(0, 4096, (tokens,), generator=g).to(device), cos_sin=rand(4096, dim),
                k_cache=rand(blocks, BLOCK, hk, dim), v_cache=rand(blocks, BLOCK, hk, dim),
                slots=torch.randperm(blocks * BLOCK, generator=g)[:tokens].to(device), gate_up=rand(tokens, 2 * inter),
                qk_norm=(rand(dim).abs() + 0.5, rand(dim).abs() + 0.5, 1e-6) if qk_norm else None)


def rotary_store(ops, t: dict) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """The layer's rotary and KV-cache store: one kernel where the ops store k/v, else two."""
    if ops.stores_kv:
        return ops.rotary_store_kv(t["positions"], t["q"], t["k"], t["v"], t["cos_sin"], t["k_cache"],
                                   t["v_cache"], t["slots"], t["qk_norm"])
    from rast_kernels.kv_store import store_kv_cache

    q, k = ops.rotary(t["positions"], t["q"], t["k"], t["cos_sin"], t["qk_norm"])
    store_kv_cache(k, t["v"], t["k_cache"], t["v_cache"], t["slots"])
    return q, k


def op_call(name: str, ops, t: dict) -> Callable[[], object]:  # noqa: ANN001
    eps = 1e-6
    if name == "add_rms_norm":
        return lambda: ops.add_rms_norm(t["x"], t["residual"], t["weight"], eps)
    if name == "rotary":
        return lambda: ops.rotary(t["positions"], t["q"], t["k"], t["cos_sin"], t["qk_norm"])
    if name == "rotary_store":
        return lambda: rotary_store(ops, t)
    if name == "silu_and_mul":
        return lambda: ops.silu_and_mul(t["gate_up"])

    def layer() -> object:  # the decode layer's elementwise work between its GEMMs and attention
        h, r = ops.add_rms_norm(t["x"], t["residual"], t["weight"], eps)
        rotary_store(ops, t)
        ops.add_rms_norm(h, r, t["weight"], eps)
        return ops.silu_and_mul(t["gate_up"])
    return layer


def bytes_moved(name: str, tokens: int, shape: tuple, elt: int) -> int:
    hidden, hq, hk, dim, inter, qk_norm = shape
    norm = (4 * tokens + 1) * hidden * elt  # read x, residual, weight; write y, residual + x
    # read and write q, k; read cos | sin (and the two norm weights)
    rotary = (2 * tokens * (hq + hk) * dim + tokens * dim + (2 * dim if qk_norm else 0)) * elt
    store = 3 * tokens * hk * dim * elt + 8 * tokens  # read v, write k and v into the cache; read the slots
    silu = 3 * tokens * inter * elt  # read gate | up, write the product
    return {"add_rms_norm": norm, "rotary": rotary, "rotary_store": rotary + store, "silu_and_mul": silu,
            "layer": 2 * norm + rotary + store + silu}[name]


def check(got: object, want: object, dtype: torch.dtype, what: str) -> None:
    pairs = zip(got, want) if isinstance(got, tuple) else [(got, want)]
    for g, w in pairs:
        unit = torch.finfo(dtype).eps * w.float().abs() + torch.finfo(dtype).tiny
        if dtype == torch.float32:
            unit = unit * 4
        if not ((g.float() - w.float()).abs() <= unit).all():
            raise AssertionError(f"{what}: fused and torch outputs differ by more than one unit of {dtype}")


def run(tokens_list: list[int], dtype: torch.dtype, device: torch.device, iters: int, copy_gbs: float,
        shapes: dict) -> list[dict]:
    import_engine()  # rast_engine, also from a bare checkout
    from rast_engine.models import layer_ops

    impls = {"fused": layer_ops.TritonLayerOps(), "torch": layer_ops.TorchLayerOps()}
    rows = []
    for model, shape in shapes.items():
        for tokens in tokens_list:
            t = make_inputs(tokens, shape, dtype, device)
            for name in OPS:
                calls = {impl: op_call(name, ops, t) for impl, ops in impls.items()}
                check(calls["fused"](), calls["torch"](), dtype, f"{model} {name} T={tokens}")
                nbytes = bytes_moved(name, tokens, shape, t["x"].element_size())
                floor_us = nbytes / (copy_gbs * 1e3)
                times = {impl: graph_time_ms(fn, device, iters) * 1e3 for impl, fn in calls.items()}
                for impl, us in times.items():
                    rows.append(dict(model=model, op=name, tokens=tokens, impl=impl, us=us, bytes=nbytes,
                                     floor_us=floor_us, gbs=nbytes / us / 1e3, of_floor=floor_us / us,
                                     speedup_vs_torch=times["torch"] / us))
                print(f"{model:>13} {name:>13} T={tokens:<5} fused {times['fused']:9.2f} us  torch "
                      f"{times['torch']:9.2f} us  floor {floor_us:8.2f} us  x{times['torch'] / times['fused']:.1f}",
                      flush=True)
    return rows


def main() -> None:
    args = quick_args(__doc__, "CPU interpreter smoke test on tiny shapes")
    if args.quick or not torch.cuda.is_available():
        device, dtype, iters, tokens = torch.device("cpu"), torch.float32, 2, [1, 5]
        shapes = {"tiny": (64, 4, 2, 16, 96, False), "tiny-qk-norm": (64, 4, 2, 16, 96, True)}
        copy_gbs = copy_bandwidth(device) / 1e9
    else:
        device, dtype, iters, tokens, shapes = torch.device("cuda"), torch.bfloat16, 200, [1, 32, 256, 4096], SHAPES
        copy_gbs = copy_bandwidth(device, 1 << 30) / 1e9
    print(f"{device_name(device)}: copy bandwidth {copy_gbs:.1f} GB/s, {dtype}", flush=True)
    rows = run(tokens, dtype, device, iters, copy_gbs, shapes)
    print(table([r for r in rows if r["op"] == "layer"], ["model", "tokens", "impl", "us", "floor_us", "gbs",
                                                          "speedup_vs_torch"]))
    if args.out is not None or device.type == "cuda":
        path = write_results("layer-ops", device, rows, dict(dtype=str(dtype), copy_gbs=copy_gbs), args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
