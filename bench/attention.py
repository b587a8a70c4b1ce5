"""Decode-attention benchmark: KV bytes read per second by paged_decode_attention, next to the GPU's
measured copy bandwidth (the roofline: a decode step reads each cached K/V element exactly once).

    python bench/attention.py            # CUDA: table, and bench/results/attention-<device>-<sha>.json
    python bench/attention.py --quick    # CPU smoke test under TRITON_INTERPRET=1, tiny shapes

Each row is one (model shape, batch, context) with split-K chosen by the heuristic and forced off
(splits=1), timed as CUDA-graph replays so launch overhead matches the engine's decode step.
Every configuration is first checked against an explicit float32 softmax on two sequences.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if "--quick" in sys.argv or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before rast_kernels decorates its kernels

from rast_kernels.paged_attention import paged_decode_attention, pick_num_splits  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth, device_name, write_results  # noqa: E402

SHAPES = {"qwen2.5-7b": (28, 4, 128), "llama-3.1-8b": (32, 8, 128)}  # (Hq, Hkv, head_dim)


def time_ms(fn, device: torch.device, iters: int) -> float:
    """Mean milliseconds per call; on CUDA, replays of a graph holding one call."""
    fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) * 1e3 / iters
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / iters


def make_case(batch: int, ctx: int, hq: int, hkv: int, dim: int, block_size: int, dtype: torch.dtype,
              device: torch.device) -> tuple:
    g = torch.Generator().manual_seed(batch * 7919 + ctx)
    per_seq = -(-ctx // block_size)
    num_blocks = batch * per_seq
    table = torch.randperm(num_blocks, generator=g).view(batch, per_seq).to(torch.int32).to(device)
    k_cache = torch.randn(num_blocks, block_size, hkv, dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, hq, dim, dtype=dtype, device=device)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, table, lens


def check(q, k_cache, v_cache, table, lens, scale: float, out: torch.Tensor) -> float:
    """Max abs error of the first two sequences against an explicit float32 softmax."""
    bs, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    err = 0.0
    for b in range(min(2, q.shape[0])):
        n = int(lens[b])
        blocks = table[b, : -(-n // bs)].long()
        k = k_cache[blocks].flatten(0, 1)[:n].float().repeat_interleave(group, 1)
        v = v_cache[blocks].flatten(0, 1)[:n].float().repeat_interleave(group, 1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b].float(), k) * scale, -1)
        err = max(err, (torch.einsum("hn,nhd->hd", p, v) - out[b].float()).abs().max().item())
    return err


def run(configs: list[tuple], dtype: torch.dtype, device: torch.device, iters: int, copy_gbs: float) -> list[dict]:
    rows = []
    for model, batch, ctx in configs:
        hq, hkv, dim = SHAPES[model] if model in SHAPES else model
        case = make_case(batch, ctx, hq, hkv, dim, 16, dtype, device)
        scale = dim ** -0.5
        kv_bytes = 2 * batch * ctx * hkv * dim * case[1].element_size()
        auto = pick_num_splits(batch, hkv, case[3].shape[1] * 16, device)
        for splits in sorted({auto, 1} | ({3} if device.type == "cpu" else set())):  # CPU: exercise split-K
            err = check(*case, scale, paged_decode_attention(*case, scale, num_splits=splits))
            tol = 1e-3 if dtype == torch.float32 else 3e-2
            if err > tol:
                raise AssertionError(f"{model} b={batch} ctx={ctx} splits={splits}: error {err:.3g} > {tol}")
            ms = time_ms(lambda: paged_decode_attention(*case, scale, num_splits=splits), device, iters)
            gbs = kv_bytes / ms / 1e6
            rows.append(dict(model=str(model), batch=batch, context=ctx, splits=splits, ms=ms, kv_gbs=gbs,
                             frac_of_copy=gbs / copy_gbs, max_abs_err=err))
            print(f"{str(model):>14} b={batch:<4} ctx={ctx:<6} splits={splits:<3} {ms * 1e3:9.1f} us "
                  f"{gbs:8.1f} GB/s  {100 * gbs / copy_gbs:5.1f}% of copy", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU interpreter smoke test on tiny shapes")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results)")
    args = parser.parse_args()
    if args.quick or not torch.cuda.is_available():
        device, dtype, iters = torch.device("cpu"), torch.float32, 2
        configs = [((4, 2, 16), 1, 40), ((4, 2, 16), 2, 300)]
        copy_gbs = copy_bandwidth(device) / 1e9
    else:
        device, dtype, iters = torch.device("cuda"), torch.bfloat16, 100
        configs = [(m, b, c) for m in SHAPES for b in (1, 8, 32, 128) for c in (1024, 4096, 16384)]
        copy_gbs = copy_bandwidth(device, 1 << 30) / 1e9
    print(f"{device_name(device)}: copy bandwidth {copy_gbs:.1f} GB/s", flush=True)
    rows = run(configs, dtype, device, iters, copy_gbs)
    if args.out is not None or device.type == "cuda":
        path = write_results("attention", device, rows, dict(dtype=str(dtype), copy_gbs=copy_gbs), args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
