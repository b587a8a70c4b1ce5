"""What an RL loop's weight sync costs a running engine, and what its sleep costs (engine/weight_updates.py,
engine/sleep_mode.py): the figures a trainer that shares the engine's GPU, or sends it its latest R, waits on.

    python bench/weight_sync.py            # CUDA: 7B + Δ1.5B, dummy weights of the real shapes
    python bench/weight_sync.py --quick    # smoke run (CPU): tiny shapes

Each row is one operation: the bytes it moves, its median wall time over a few calls (each call returns with
its copies done, so this is what the loop waits), and its floor, those bytes over the bandwidth of that
kind of copy measured here (on a CPU every copy is a memcpy: device copy bandwidth):
- load_device: all of R's tensors written by load_weights from tensors on the device (a trainer on the same
  GPU); floor: read and written once, over device copy bandwidth;
- load_pinned, load_pageable: the same from host tensors, pinned or not; floor: over pinned host-to-device
  bandwidth (CUDA only);
- sleep: level 1, every weight copied to pinned host memory and the KV cache freed; floor: the weights'
  bytes over device-to-host bandwidth;
- wake_weights: the weights back; floor: over host-to-device bandwidth;
- wake_kv_cache: the KV cache zeroed (written once, over copy bandwidth) and, on CUDA, the decode graphs
  captured again, which is host work the floor leaves out.
Writes bench/results/weight-sync-<device>-<sha>.json.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402
from bench.decode_configs import materialize  # noqa: E402
from bench.decode_runs import LAM  # noqa: E402

CALLS = 3


def wall_ms(fn: Callable[[], object], device: torch.device, calls: int = CALLS) -> float:
    samples = []
    for _ in range(calls):
        common.sync(device)
        t0 = time.perf_counter()
        fn()
        common.sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def build(rast: object, dirs: list[Path], dtype: str, device: torch.device, quick: bool) -> object:
    return rast.LLMEngine(rast.EngineConfig(
        model=str(dirs[0]), small_rl=str(dirs[1]), small_base=str(dirs[2]), lam=LAM, load_format="dummy",
        dtype=dtype, device=str(device), kv_cache_blocks=64 if quick else 2048, max_num_seqs=8, max_model_len=512))


def decode_some(rast: object, engine: object) -> None:
    """A few requests run to their end: the engine has served (its graphs warm) before anything is timed."""
    for i in range(4):
        engine.add_request(f"warm{i}", [5 + i] * 32, rast.SamplingParams(max_tokens=8, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()


def main() -> None:
    args = common.quick_args(__doc__, "smoke run: tiny shapes on the CPU")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(2)
    quick, pairing = device.type == "cpu", "tiny" if device.type == "cpu" else "7b+1.5b"
    dtype = torch.float32 if quick else torch.bfloat16
    copy_bw = common.copy_bandwidth(device)
    h2d, d2h = ((common.pinned_bandwidth(device, to_device=True), common.pinned_bandwidth(device, to_device=False))
                if device.type == "cuda" else (copy_bw / 2, copy_bw / 2))
    rast, rows = common.import_engine(), []
    with tempfile.TemporaryDirectory() as tmp:
        dirs, _ = materialize(pairing, Path(tmp))
        engine = build(rast, dirs, str(dtype).replace("torch.", ""), device, quick)
        decode_some(rast, engine)
        slots = engine.model_set.models[1].weight_map()
        on_device = [(name, p.narrow(0, start, rows).clone()) for name, (p, start, rows) in slots.items()]
        r_bytes = sum(t.nbytes for _, t in on_device)
        sources = {"load_device": (on_device, 2 * r_bytes / copy_bw)}
        if device.type == "cuda":
            sources["load_pinned"] = ([(n, t.cpu().pin_memory()) for n, t in on_device], r_bytes / h2d)
            sources["load_pageable"] = ([(n, t.cpu()) for n, t in on_device], r_bytes / h2d)
        for op, (named, floor_s) in sources.items():
            ms = wall_ms(lambda named=named: engine.load_weights(named), device)
            rows.append(dict(op=op, bytes=r_bytes, ms=ms, floor_ms=floor_s * 1e3))
        weight_bytes = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                            for m in engine.model_set.models for t in (*m.parameters(), *m.buffers())}.values())
        timed: dict[str, list[float]] = {"sleep": [], "wake_weights": [], "wake_kv_cache": []}
        for _ in range(CALLS):
            for op, fn in (("sleep", engine.sleep), ("wake_weights", lambda: engine.wake_up(["weights"])),
                           ("wake_kv_cache", lambda: engine.wake_up(["kv_cache"]))):
                timed[op].append(wall_ms(fn, device, calls=1))
            decode_some(rast, engine)  # it serves after waking
        floors = {"sleep": weight_bytes / d2h, "wake_weights": weight_bytes / h2d,
                  "wake_kv_cache": engine.kv.bytes / (copy_bw / 2)}
        for op, samples in timed.items():
            moved = engine.kv.bytes if op == "wake_kv_cache" else weight_bytes
            rows.append(dict(op=op, bytes=moved, ms=statistics.median(samples), floor_ms=floors[op] * 1e3))
        graphs = engine.runner.graphs
        buckets = [] if graphs is None else sorted(graphs.graphs)
    for row in rows:
        row["floor_frac"] = row["floor_ms"] / row["ms"]
        print(f"  {row['op']:>14} {row['bytes'] / 2**20:10.1f} MiB {row['ms']:9.2f} ms (floor {row['floor_ms']:8.2f})",
              flush=True)
    print(f"weight sync and sleep, {pairing} | {common.device_name(device)} | commit {common.git_sha()}")
    print(common.table(rows, ["op", "bytes", "ms", "floor_ms", "floor_frac"]))
    if common.keeps_results(args.out, device, args.quick):
        path = common.write_results("weight-sync", device, rows, dict(
            pairing=pairing, copy_bytes_per_s=copy_bw, h2d_bytes_per_s=h2d, d2h_bytes_per_s=d2h,
            graph_buckets=buckets), out_dir=args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
