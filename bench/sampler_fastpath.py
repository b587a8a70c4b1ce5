"""How often the fused Triton sampler draws from its candidates alone (one read of the inputs) rather
than falling back to the full-row threshold search, on LM-like rows, under a GPU's launch plan.

Which path a row takes depends only on the data and the plan (chunks per row, candidates per chunk),
never on the hardware: the kernel's arithmetic is the same. So on a CPU this script interprets the
kernel (TRITON_INTERPRET=1) under the plan the fused sampler would pick on a GPU with ``--sms`` SMs
(132: an H100 SXM) for each batch size, on ``--rows`` sample rows; on a GPU it runs natively at the
real batch size. Rows: bench/sampler.py's bf16 Zipf-like logits (entropy 1-4 nats) and RAST pairs.
Writes bench/results/sampler-fastpath-<device>-<shortsha>.json: per configuration fast_fraction, and
of the fast rows, proven_fraction (drawn by ``_select``'s proven draw, not after searching the top-p
threshold), k_searched_fraction (top-k with top-p: proven only after the top-k search, the rows Z_K's
bounds left open) and mean_tries / max_tries (candidate draws tried until one was proven, in the last
phase; each try is three or four block-wide reductions where the top-p threshold search ran up to 31).

    python bench/sampler_fastpath.py            # CPU: B-plans 1, 32, 256 at V=152064 (about 10 min)
    python bench/sampler_fastpath.py --quick    # seconds: a small vocabulary, 2 rows
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import device_name, git_sha, keeps_results, table, write_results  # noqa: E402
from bench.sampler import TOP_P, lm_logits, rast_pair  # noqa: E402
from rast_kernels import sampler_triton  # noqa: E402
from rast_kernels.sampler_triton_select import K_SEARCHED  # noqa: E402
from rast_kernels.batch import normalize  # noqa: E402

GPU_BLOCK = 1024  # the block the fused sampler uses on a GPU (sampler_triton.launch_plan)


def measure(rows: int, plan_batch: int, vocab: int, pairs: int, top_k: int, min_p: float, sms: int | None,
            device: torch.device, gen: torch.Generator) -> dict:
    """The fraction of ``rows`` LM-like rows taking the fast path under the plan for ``plan_batch``."""
    logits = lm_logits(rows, vocab, device, gen)
    deltas = [rast_pair(rows, vocab, device, gen) for _ in range(pairs)]
    batch = normalize(logits, deltas, weights=1.0, temperature=1.0, top_k=top_k, top_p=TOP_P, min_p=min_p,
                      seed=torch.arange(rows, device=device))
    if device.type == "cuda":
        block, chunk, splits, cap = sampler_triton.launch_plan(rows, vocab, sms)
    else:
        block, chunk, splits, cap = sampler_triton.launch_plan(plan_batch, vocab, sms, block=GPU_BLOCK)
    fast, tries = (torch.empty(rows, dtype=torch.int64, device=device) for _ in range(2))
    sampler_triton.sample(batch, block=block, chunk=chunk, cap=cap, fast_out=fast, tries_out=tries)
    proven = tries[tries > 0]  # only fast rows try draws
    k_searched = int((proven > K_SEARCHED.value).sum())
    proven = (proven % K_SEARCHED.value).float()
    n_fast = max(int(fast.sum()), 1)
    return dict(plan_batch=plan_batch, rows=rows, vocab=vocab, pairs=pairs, top_k=top_k, min_p=min_p,
                chunk=chunk, splits=splits, cap=cap, fast_fraction=round(float(fast.float().mean()), 4),
                proven_fraction=round(proven.numel() / n_fast, 4), k_searched_fraction=round(k_searched / n_fast, 4),
                mean_tries=round(float(proven.mean()), 3) if proven.numel() else None,
                max_tries=int(proven.max()) if proven.numel() else None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few-second smoke run")
    ap.add_argument("--sms", type=int, default=None, help="SMs of the emulated GPU (CPU; default 132)")
    ap.add_argument("--rows", type=int, default=8, help="rows interpreted per configuration (CPU)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if args.sms is not None:
            ap.error("--sms emulates a GPU's plan on a CPU; on a GPU the real SM count is used")
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 132 if args.sms is None else args.sms
    if args.rows < 1 or sms < 1:
        ap.error("--rows and --sms must be >= 1")
    if args.quick:
        grid = dict(batch=[1, 32], vocab=[8192], pairs=[1], top_k=[0, 50], min_p=[0.0])
        args.rows = min(args.rows, 2)
    elif device.type == "cuda":
        grid = dict(batch=[1, 8, 32, 128, 256], vocab=[32000, 128256, 152064], pairs=[0, 1], top_k=[0, 50],
                    min_p=[0.0, 0.05])
    else:
        grid = dict(batch=[1, 32, 256], vocab=[152064], pairs=[0, 1], top_k=[0, 50], min_p=[0.0, 0.05])
    gen = torch.Generator().manual_seed(0)
    results = []
    for b, v, k, top_k, min_p in itertools.product(grid["batch"], grid["vocab"], grid["pairs"], grid["top_k"],
                                                   grid["min_p"]):
        rows = b if device.type == "cuda" else args.rows
        results.append(measure(rows, b, v, k, top_k, min_p, sms, device, gen))
        r = results[-1]
        print(f"plan B={b} V={v} K={k} top_k={top_k} min_p={min_p}: fast {r['fast_fraction']}, proven "
              f"{r['proven_fraction']} (after the top-k search {r['k_searched_fraction']}), tries {r['mean_tries']} "
              f"(max {r['max_tries']})", flush=True)
    emulated = device.type != "cuda"
    print(f"fused sampler fast path | device: {device_name(device)} | commit: {git_sha()} | plan for {sms} SMs"
          f"{' (emulated: interpreted kernel)' if emulated else ''} | T=1 top_p={TOP_P}")
    print(table(results, list(results[0])))
    if keeps_results(args.out, device, args.quick):
        path = write_results("sampler-fastpath", device, results, out_dir=args.out,
                             extra=dict(sms=sms, emulated=emulated, top_p=TOP_P, temperature=1.0))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
