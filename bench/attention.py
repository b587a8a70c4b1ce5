"""Decode-attention benchmark: KV bytes read per second by paged_decode_attention, next to the GPU's
measured copy bandwidth (the roofline: a decode step reads each cached K/V element exactly once).

    python bench/attention.py            # CUDA: table, and bench/results/attention-<device>-<sha>.json
    python bench/attention.py --quick    # CPU smoke test under TRITON_INTERPRET=1, tiny shapes

Each row is one (model shape, batch, context, block-table width) with split-K chosen by the heuristic
and forced off (splits=1), timed as CUDA-graph replays so launch overhead matches the engine's decode
step, each replay calling over enough copies of the caches to exceed the L2 cache twice (a decode step's
attention reads its KV from HBM: a layer's weights evicted it), so small rows measure HBM, not L2.
Tight rows have a table exactly as wide as the context. Graph-mode rows mirror the engine under
CUDA graphs: the table is padded to a long max_model_len (GRAPH_TABLE tokens) around short live
contexts, so the heuristic's split count comes from the padded width and each sequence fills only the
splits its own context needs; they also run with a lower per-split floor (min=64) to show whether the
default floor of 256 tokens leaves the GPU underfilled at short contexts.
Tight rows of the first model also run over an FP8 cache (kv fp8, kv_cache_dtype="fp8": e4m3 values and
a scale byte a token and KV head, rast_kernels.fp8_kv): about half the bytes, so the same time would
mean about half the GB/s.
Every configuration is first checked against an explicit float32 softmax on two sequences.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if "--quick" in sys.argv or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before rast_kernels decorates its kernels

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # rast_kernels from a bare checkout too
from bench.common import copy_bandwidth, device_name, graph_time_ms, quick_args, write_results  # noqa: E402
from rast_kernels.fp8_cast import FP8  # noqa: E402
from rast_kernels.fp8_kv import block_size_of, cache_rows, read_blocks  # noqa: E402
from rast_kernels.kv_store import store_kv_cache  # noqa: E402
from rast_kernels.paged_attention import paged_decode_attention  # noqa: E402
from rast_kernels.split_k import MIN_TOKENS_PER_SPLIT, pick_num_splits  # noqa: E402

SHAPES = {"qwen2.5-7b": (28, 4, 128), "llama-3.1-8b": (32, 8, 128)}  # (Hq, Hkv, head_dim)
BLOCK_SIZE = 16
GRAPH_TABLE = 32768  # graph-mode rows: the block table's width in tokens (a long max_model_len)
L2_BYTES = 64 * 2**20  # as bench/gemm.py: above an H100's 50 MB and an H200's 60 MB L2


def rotated(case: tuple, device: torch.device) -> list[tuple]:
    """The case and copies of its caches, together at least twice L2 on a GPU (one copy on a CPU)."""
    cache_bytes = 2 * case[1].numel() * case[1].element_size()
    copies = max(1, -(-2 * L2_BYTES // cache_bytes)) if device.type == "cuda" else 1
    return [case] + [(case[0], case[1].clone(), case[2].clone(), *case[3:]) for _ in range(copies - 1)]


def make_case(batch: int, ctx: int, table_tokens: int, hq: int, hkv: int, dim: int, block_size: int,
              dtype: torch.dtype, device: torch.device) -> tuple:
    """Caches holding the live blocks only; the table's padding columns are 0, as DecodeBuffers pads."""
    g = torch.Generator().manual_seed(batch * 7919 + ctx)
    per_seq = -(-ctx // block_size)
    num_blocks = batch * per_seq
    table = torch.zeros(batch, max(per_seq, -(-table_tokens // block_size)), dtype=torch.int32)
    table[:, :per_seq] = torch.randperm(num_blocks, generator=g).view(batch, per_seq).to(torch.int32)
    table = table.to(device)
    k_cache = torch.randn(num_blocks, block_size, hkv, dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, hq, dim, dtype=dtype, device=device)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, table, lens


def fp8_caches(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same values stored as the engine's FP8 cache holds them, scales and all."""
    num_blocks, bs, hkv, dim = k_cache.shape
    kc, vc = (torch.zeros(num_blocks, cache_rows(bs, dim, FP8), hkv, dim, dtype=FP8, device=k_cache.device)
              for _ in range(2))
    slots = torch.arange(num_blocks * bs, device=k_cache.device)
    store_kv_cache(k_cache.flatten(0, 1), v_cache.flatten(0, 1), kc, vc, slots)
    return kc, vc


def check(q, k_cache, v_cache, table, lens, scale: float, out: torch.Tensor) -> float:
    """Max abs error of the first two sequences against an explicit float32 softmax (over the dequantised
    values of an FP8 cache)."""
    bs, group = block_size_of(k_cache), q.shape[1] // k_cache.shape[2]
    err = 0.0
    for b in range(min(2, q.shape[0])):
        n = int(lens[b])
        blocks = table[b, : -(-n // bs)].long()
        k = read_blocks(k_cache, blocks).flatten(0, 1)[:n].float().repeat_interleave(group, 1)
        v = read_blocks(v_cache, blocks).flatten(0, 1)[:n].float().repeat_interleave(group, 1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b].float(), k) * scale, -1)
        err = max(err, (torch.einsum("hn,nhd->hd", p, v) - out[b].float()).abs().max().item())
    return err


def run(configs: list[tuple], dtype: torch.dtype, device: torch.device, iters: int, copy_gbs: float) -> list[dict]:
    rows = []
    fp8_model = configs[0][0]
    for model, batch, ctx, table_tokens, kv in [(*c, kv) for c in configs
                                                for kv in ("model", "fp8")[:2 if c[0] == fp8_model and not c[3] else 1]]:
        hq, hkv, dim = SHAPES[model] if model in SHAPES else model
        case = make_case(batch, ctx, table_tokens, hq, hkv, dim, BLOCK_SIZE, dtype, device)
        if kv == "fp8":
            case = (case[0], *fp8_caches(case[1], case[2]), *case[3:])
        scale = dim ** -0.5
        cases = rotated(case, device)
        fp8 = case[1].dtype == FP8  # a scale byte a token and head beside its values
        kv_bytes = 2 * batch * ctx * hkv * (dim * case[1].element_size() + fp8)
        width = case[3].shape[1] * BLOCK_SIZE
        runs = {(s, MIN_TOKENS_PER_SPLIT) for s in (pick_num_splits(batch, hkv, width, device), 1)}
        if device.type == "cpu":
            runs.add((3, 16))  # exercise split-K on tiny shapes
        if table_tokens:  # graph mode: the heuristic's splits at a lower floor too
            runs.add((pick_num_splits(batch, hkv, width, device, 64), 64))
        for splits, floor in sorted(runs):
            kw = dict(num_splits=splits, min_tokens_per_split=floor)
            err = check(*case, scale, paged_decode_attention(*case, scale, **kw))
            tol = 1e-3 if dtype == torch.float32 else 3e-2
            if err > tol:
                raise AssertionError(f"{model} b={batch} ctx={ctx} table={width} {kw}: error {err:.3g} > {tol}")
            ms = graph_time_ms(lambda: [paged_decode_attention(*c, scale, **kw) for c in cases], device,
                               iters) / len(cases)
            gbs = kv_bytes / ms / 1e6
            rows.append(dict(model=str(model), kv=kv, batch=batch, context=ctx, table_tokens=width, splits=splits,
                             min_split_tokens=floor, ms=ms, kv_gbs=gbs, frac_of_copy=gbs / copy_gbs,
                             max_abs_err=err))
            print(f"{str(model):>14} {kv:>5} b={batch:<4} ctx={ctx:<6} table={width:<6} splits={splits:<3} min={floor:<4}"
                  f"{ms * 1e3:9.1f} us {gbs:8.1f} GB/s  {100 * gbs / copy_gbs:5.1f}% of copy", flush=True)
    return rows


def main() -> None:
    args = quick_args(__doc__, "CPU interpreter smoke test on tiny shapes")
    if args.quick or not torch.cuda.is_available():
        device, dtype, iters = torch.device("cpu"), torch.float32, 2
        configs = [((4, 2, 16), 1, 40, 0), ((4, 2, 16), 2, 300, 0), ((4, 2, 16), 2, 70, 1024)]
        copy_gbs = copy_bandwidth(device) / 1e9
    else:
        device, dtype, iters = torch.device("cuda"), torch.bfloat16, 100
        configs = [(m, b, c, 0) for m in SHAPES for b in (1, 8, 32, 128) for c in (1024, 4096, 16384)]
        configs += [(m, b, c, GRAPH_TABLE) for m in SHAPES for b in (1, 8, 32) for c in (300, 1024, 4096)]
        copy_gbs = copy_bandwidth(device, 1 << 30) / 1e9
    print(f"{device_name(device)}: copy bandwidth {copy_gbs:.1f} GB/s", flush=True)
    rows = run(configs, dtype, device, iters, copy_gbs)
    if args.out is not None or device.type == "cuda":
        path = write_results("attention", device, rows, dict(dtype=str(dtype), copy_gbs=copy_gbs), args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
