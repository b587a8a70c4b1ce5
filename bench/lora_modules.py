"""Several LoRA RL models over one small base, one per request (engine/lora_modules.py): what a decode step
costs as the adapters served grow, beside the same adapter served alone as small_rl.

    python bench/lora_modules.py            # CUDA: 7B + Δ1.5B, rank 64; 1, 2, 4, 8 adapters; batch 1, 8, 32
    python bench/lora_modules.py --quick    # smoke run (CPU): tiny shapes, rank 8, 1 and 2 adapters, batch 2

Rows: mode "small_rl" (one adapter as the pair's RL model: its model one LoRA view of S) and
"lora_modules" with N adapters, the batch's requests spread over them in turn. Weights are dummy (random,
bench/decode_configs.py's shapes), the adapters random too: timing only. Each row gives the decode step
time and tokens/s (bench/decode_runs.engine_generate: whole engine steps through the public API) and its
floor, the bytes a step must read over measured copy bandwidth: M's and S's weights, the adapters' A and
B, and the three models' KV at the mean context (R's cache is one whatever N). On CUDA the layer ops add
the deltas with rast_kernels.lora_slots, which reads the A and the diagonal blocks of B of only the
min(N, batch) adapters the batch uses; the CPU's torch ops read every slot's A and whole B (a mask on the
rank columns), so --quick's floor counts those.

Then what loading one adapter into a slot costs (``loads`` in the JSON), with the largest engine: the host
time of LLMEngine.load_lora_adapter, cold (its files read) and warm (the host copy max_cpu_loras keeps),
and on CUDA the device time of the slot's writes, queued behind a spinning kernel so that only the copies
are timed (while the host issues them within the spin, about a second), against its bytes over measured
pinned host-to-device bandwidth (the load itself never waits for the device: models/lora_slots.write_slot).
Writes bench/results/lora-modules-<device>-<sha>.json.
"""
from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402
from bench.decode_configs import materialize, write_adapter  # noqa: E402
from bench.decode_runs import LAM, engine_generate  # noqa: E402
from bench.roofline import roofline_ms  # noqa: E402

PROMPT, GEN, WARMUP = 128, 64, 4


def build(rast: object, dirs: list[Path], adapters: dict[str, str] | None, batch: int, dtype: str,
          device: torch.device) -> object:
    pair = (dict(small_rl=str(dirs[1]), small_base=str(dirs[2])) if adapters is None
            else dict(small_base=str(dirs[2]), lora_modules=adapters))
    length = PROMPT + GEN
    return rast.LLMEngine(rast.EngineConfig(
        model=str(dirs[0]), lam=LAM, **pair, load_format="dummy", dtype=dtype, device=str(device),
        kv_cache_blocks=batch * math.ceil(length / 16) + 1, max_num_seqs=batch, max_model_len=length,
        max_num_batched_tokens=max(batch * PROMPT, length)))


def time_loads(engine: object, name: str, path: str, device: torch.device) -> dict:
    """Adapter ``name`` unloaded and loaded again from ``path``, cold then warm (module docstring)."""
    out: dict = {}
    for tag in ("cold", "warm"):
        engine.unload_lora_adapter(name)
        common.sync(device)
        if device.type == "cuda":
            torch.cuda._sleep(2_000_000_000)  # about a second: the copies queue behind it, then run back to back
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        engine.load_lora_adapter(name, path)
        out[f"{tag}_host_ms"] = (time.perf_counter() - t0) * 1e3
        if device.type == "cuda":
            end.record()
            end.synchronize()
            out[f"{tag}_device_ms"] = start.elapsed_time(end)
    registry = engine.model_set.lora
    deltas = registry.host[str(Path(path).resolve())][1]
    out["bytes"] = sum(d.a.nbytes + d.b.nbytes for d in deltas)
    if device.type == "cuda":
        bandwidth = common.pinned_bandwidth(device, to_device=True)
        out.update(h2d_bytes_per_s=bandwidth, floor_ms=out["bytes"] / bandwidth * 1e3)
    return out


def main() -> None:
    args = common.quick_args(__doc__, "smoke run: tiny shapes, 1 and 2 adapters, batch 2")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(2)
    quick = device.type == "cpu"
    pairing, counts, batches = ("tiny-lora", [1, 2], [2]) if quick else ("7b+1.5b-lora", [1, 2, 4, 8], [1, 8, 32])
    dtype = torch.float32 if quick else torch.bfloat16
    elt, bandwidth = torch.empty((), dtype=dtype).element_size(), common.copy_bandwidth(device)
    rast, rows = common.import_engine(), []
    with tempfile.TemporaryDirectory() as tmp:
        dirs, cfgs = materialize(pairing, Path(tmp))
        rank = cfgs[1]["lora_rank"]
        adapters = {f"a{i}": str(dirs[1]) if i == 0 else str(Path(tmp) / f"a{i}") for i in range(max(counts))}
        for i in range(1, max(counts)):
            Path(adapters[f"a{i}"]).mkdir()
            write_adapter(Path(adapters[f"a{i}"]), dirs[2], cfgs[2], rank, seed=i)
        for mode, n in [("small_rl", 1)] + [("lora_modules", n) for n in counts]:
            served = None if mode == "small_rl" else dict(list(adapters.items())[:n])
            engine = build(rast, dirs, served, max(batches), str(dtype).replace("torch.", ""), device)
            loras = [None] if served is None else list(served)
            for batch in batches:
                for gen, tag in ((WARMUP, "warm"), (GEN, "run")):
                    res = engine_generate(engine, rast.SamplingParams, batch, PROMPT, gen, engine.vocab_size,
                                          f"{tag}-{mode}{n}-{batch}", device, loras)
                gathered = device.type == "cuda" and mode == "lora_modules"  # n slots held, min(n, batch) read
                slots = dict(lora_rank=rank * n, lora_gathered=gathered, lora_read_rank=rank * min(n, batch))
                used = cfgs[:1] + [{**cfgs[1], **slots}] + cfgs[2:]
                rows.append(dict(mode=mode, adapters=n, batch=batch, rank=rank, **res,
                                 **roofline_ms(used, elt, batch, PROMPT + GEN / 2, bandwidth)))
                print(f"  {mode:>12} N={n} b={batch:<3} {res['tokens_per_s']:9.1f} tok/s {res['step_ms']:8.3f} "
                      f"ms/step (floor {rows[-1]['roofline_ms']:.3f})", flush=True)
            if mode == "lora_modules" and n == max(counts):
                last = f"a{n - 1}"
                loads = time_loads(engine, last, adapters[last], device)
                print(f"  load of {last}: {loads}", flush=True)
            del engine  # before the next one is built: two engines' weights need not fit
            common.release(device)
    print(f"LoRA adapters per request, {pairing} | {common.device_name(device)} | commit {common.git_sha()}")
    print(common.table(rows, ["mode", "adapters", "batch", "tokens_per_s", "step_ms", "roofline_ms"]))
    if common.keeps_results(args.out, device, args.quick):
        path = common.write_results("lora-modules", device, rows, dict(pairing=pairing, rank=rank, prompt=PROMPT,
                                                                      gen=GEN, bandwidth_bytes_per_s=bandwidth, loads=loads),
                                    args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
