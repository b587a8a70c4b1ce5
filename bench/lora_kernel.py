"""LoRA slot deltas: rast_kernels.lora_slots (reads only the slots the tokens use, and B's diagonal blocks)
against the engine's torch path (x·Aᵀ over every slot, a where keeping each token's own columns, the B
GEMM over every slot), for one decoder layer's four projections of a small RL model with adapters chosen per
request (engine/models/lora_slots.py's layout).

    python bench/lora_kernel.py            # CUDA: Qwen2.5-1.5B, rank 64; 1-8 slots loaded; 1-256 tokens
    python bench/lora_kernel.py --quick    # CPU smoke test under TRITON_INTERPRET=1, tiny shapes

Tokens take slots in turn (token t: slot t mod N), so min(N, tokens) slots are in use. Timed as CUDA-graph
replays (bench.common.graph_time_ms), as the engine's captured step runs them. Each row gives the bytes
the implementation reads and writes (its weights, x once, y read and written), the floor (the gathered
kernel's bytes, what a step must move, over measured copy bandwidth) and the achieved GB/s. Every
configuration is first checked: both outputs within a few units of the dtype.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if "--quick" in sys.argv or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before rast_kernels decorates its kernels

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # rast_kernels from a bare checkout too
from bench.common import copy_bandwidth, device_name, graph_time_ms, quick_args, table, write_results  # noqa: E402
from rast_kernels.lora_slots import lora_slots_add_  # noqa: E402

# (hidden, q size, kv size, intermediate), from bench/configs
SHAPES = {"qwen2.5-1.5b": (1536, 1536, 256, 8960)}


def projections(shape: tuple[int, int, int, int]) -> dict[str, tuple[int, list[int], int]]:
    """name -> (in features, part starts, out features) of a decoder layer's fused projections."""
    h, q, kv, inter = shape
    return {"qkv": (h, [0, q, q + kv], q + 2 * kv), "o": (q, [0], h), "gate_up": (h, [0, inter], 2 * inter),
            "down": (inter, [0], h)}


def make(k: int, starts: list[int], n: int, slots: int, rank: int, tokens: int, dtype: torch.dtype,
         device: torch.device) -> dict:
    g = torch.Generator().manual_seed(k + n + tokens)
    width = len(starts) * rank
    a = torch.randn(slots * width, k, generator=g) / k ** 0.5
    b = torch.randn(n, slots * width, generator=g) / rank
    bounds = [*starts[1:], n]
    for s in range(slots):  # B block diagonal within a slot, as the engine writes it
        for p, (lo, hi) in enumerate(zip(starts, bounds)):
            for q in range(len(starts)):
                if q != p:
                    b[lo:hi, s * width + q * rank:s * width + (q + 1) * rank] = 0
    ids = torch.arange(tokens) % slots
    column_slot = torch.arange(slots * width) // width
    return dict(x=torch.randn(tokens, k, generator=g).to(device, dtype), y=torch.randn(tokens, n, generator=g),
                a=a.to(device, dtype), b=b.to(device, dtype), ids=ids.to(device, torch.int32),
                mask=(ids[:, None] == column_slot).to(device), width=width, starts=starts, slots=slots)


def gathered(t: dict, y: torch.Tensor) -> torch.Tensor:
    return lora_slots_add_(y, t["x"], t["a"], t["b"], t["ids"], t["slots"], t["starts"])


def masked(t: dict, y: torch.Tensor) -> torch.Tensor:
    """The engine's torch path (SlotLoraLinear without the kernel); the mask is made once a step there."""
    return y.addmm_(torch.where(t["mask"], t["x"] @ t["a"].t(), 0), t["b"].t())


def bytes_moved(t: dict, n: int, elt: int, all_slots: bool) -> int:
    tokens, k = t["x"].shape
    used = t["slots"] if all_slots else min(t["slots"], tokens)
    rank = t["width"] // len(t["starts"])
    b_cols = t["width"] if all_slots else rank  # the gathered kernel reads each row's own part only
    return (used * (t["width"] * k + n * b_cols) + tokens * (k + 2 * n)) * elt


def run(shapes: dict, slot_counts: list[int], tokens_list: list[int], rank: int, dtype: torch.dtype,
        device: torch.device, iters: int, copy_gbs: float) -> list[dict]:
    rows = []
    for model, shape in shapes.items():
        for slots in slot_counts:
            for tokens in tokens_list:
                cases = {name: (make(k, starts, n, slots, rank, tokens, dtype, device), n)
                         for name, (k, starts, n) in projections(shape).items()}
                for name, (t, n) in cases.items():
                    y = t["y"].to(device, dtype)
                    got, want = gathered(t, y.clone()), masked(t, y.clone())
                    tol = 8 * torch.finfo(dtype).eps
                    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())
                impls = {"gathered": gathered, "masked": masked}
                floor = sum(bytes_moved(t, n, t["x"].element_size(), False) for t, n in cases.values())
                times = {}
                for impl, fn in impls.items():
                    ys = {name: t["y"].to(device, dtype) for name, (t, _) in cases.items()}
                    times[impl] = graph_time_ms(lambda: [fn(t, ys[name]) for name, (t, _) in cases.items()],
                                                device, iters) * 1e3
                    moved = sum(bytes_moved(t, n, t["x"].element_size(), impl == "masked") for t, n in cases.values())
                    rows.append(dict(model=model, slots=slots, tokens=tokens, rank=rank, impl=impl, us=times[impl],
                                     bytes=moved, floor_us=floor / (copy_gbs * 1e3), gbs=moved / times[impl] / 1e3))
                print(f"{model} N={slots} T={tokens:<4} gathered {times['gathered']:8.2f} us  masked "
                      f"{times['masked']:8.2f} us  floor {floor / (copy_gbs * 1e3):8.2f} us", flush=True)
    return rows


def main() -> None:
    args = quick_args(__doc__, "CPU interpreter smoke test on tiny shapes")
    if args.quick or not torch.cuda.is_available():
        device, dtype, iters, rank = torch.device("cpu"), torch.float32, 2, 8
        shapes, slot_counts, tokens = {"tiny": (64, 64, 32, 96)}, [1, 2], [1, 5]
    else:
        device, dtype, iters, rank = torch.device("cuda"), torch.bfloat16, 100, 64
        shapes, slot_counts, tokens = SHAPES, [1, 2, 4, 8], [1, 8, 32, 256]
    copy_gbs = copy_bandwidth(device, 1 << 30) / 1e9
    print(f"{device_name(device)}: copy bandwidth {copy_gbs:.1f} GB/s, {dtype}, rank {rank}", flush=True)
    rows = run(shapes, slot_counts, tokens, rank, dtype, device, iters, copy_gbs)
    print(table(rows, ["model", "slots", "tokens", "impl", "us", "floor_us", "gbs"]))
    if args.out is not None or device.type == "cuda":
        path = write_results("lora-kernel", device, rows, dict(dtype=str(dtype), copy_gbs=copy_gbs, rank=rank),
                             args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
