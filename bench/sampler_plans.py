"""The fused sampler under other launch plans: which candidates per chunk (CAP), warps per program and
candidate margin (WIDE, nats) the vocabulary-split kernel and the per-row kernel should get at each
batch size.

The first H100 run (bench/results/sampler-nvidia-h100-80gb-hbm3-8759dcb.json) put ``_stats`` at 6x its
HBM floor at B = 256, where the default plan (CAP = 1024, 4 warps) compiles to 224 registers a thread,
two programs per SM (bench/sass_loops.py --kernel stats), and ``_select`` at 18-25 µs at every batch
size. This sweep times each plan in a CUDA graph (as the engine replays the sampler), with the fraction
of rows that still draw from their candidates alone (a smaller CAP can send rows to the fallback, which
reads the row again). Rows: bench/sampler.py's LM-like bf16 logits with one RAST pair, T = 1,
top_p = 0.95. Writes bench/results/sampler-plans-<device>-<shortsha>.json; the fastest plan per batch
size is printed last. Two more rows per batch size time the default plan on flat rows (N(0, 1.2²)
logits for each model, as random-weight models give bench/decode.py), where no row can take the fast
path: ``rows: flat`` draws over every token and proves the draw lies in the nucleus with one more read
of the row (``verified_fraction``: the rows where that proof succeeded, rast_kernels.sampler_triton_finish);
``rows: flat-search`` (verify=False) searches the threshold first, the full-row descent that cost
3.8 ms a decode step on the H100 at 8759dcb. ``rows: lm-search`` (proof_tries=0) times the LM-like rows
with ``_select`` searching each fast row's top-p threshold among its candidates (up to 31 block-wide
reductions, about 19 µs at 8759dcb) before it draws, where by default it draws first and proves the
draw (``proven_fraction``: the rows its first PROOF_TRIES draws settled; rast_kernels.sampler_triton_select).
Since then ``_stats``' block loop keeps lane-local lists and reduces nothing across lanes (no barrier
per block; 128 registers, its cap, at its default 8 warps, 254 at 4, 64 and 8 spilled bytes at 16), so its warps
trade occupancy against the width of the chunk-end reductions: the sweep times 4, 8 and 16. Its lanes
keep 4 tokens each, so chunks are cut to sampler_triton_plan.LANE_TOKENS blocks (7 chunks of 512 candidates
at B = 256 where 4 programs per SM gave 3 of 1024): one row per batch size where that cut applies times
the uncut chunk, whose fast-path rate and time say whether the cut's extra chunk ends pay.
A narrower margin admits fewer candidates (less for the chunk's floor search to cut), but
below the rows' top-p threshold (4-8.4 nats below the max on these rows) it sends rows to the fallback:
interpreted under the B = 8 plan, WIDE 6 did so for 2 of 8 rows and WIDE 8 for none.

    python bench/sampler_plans.py [--out DIR]   # CUDA: B 256, 1, 32, 8 at V = 152064 (a minute or two)
    python bench/sampler_plans.py --quick       # interpreted on a CPU: B 1, 4 at V = 4096 (smoke run)
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (copy_bandwidth, device_name, git_sha, graph_time_ms, quick_args, table,  # noqa: E402
                          write_results)
from bench.sampler import TOP_P, lm_logits, rast_pair  # noqa: E402
from rast_kernels import sampler_triton  # noqa: E402
from rast_kernels.batch import SamplingBatch, normalize  # noqa: E402

STATS_WARPS = (4, 8, 16)
SELECT_WARPS = (4, 8, 16)
WIDES = (8.0, 12.0)  # beside sampler_triton.WIDE (10)


def caps(default: int) -> list[int]:
    """The default CAP and CAP / 2, CAP / 4 (at least 4): the default already fills _select's tile of
    sampler_triton_plan.TILE slots, and a larger one would double it (more registers, likely spills)."""
    return sorted({c for c in (default // 4, default // 2, default) if c >= 4})


def plans(default_cap: int, quick: bool) -> list[tuple[int, int, int, float, bool]]:
    """(CAP, _stats warps, _select warps, WIDE, long chunks): every CAP with each _stats warp count, then
    _select's warps and the margin each at the default plan (each distinct plan compiles its kernels
    anew), then the default CAP over chunks not cut to sampler_triton_plan.LANE_TOKENS blocks (run only where
    that cut changes the plan: B >= 128 at V = 152064 on an H100).
    Interpreted, warps change nothing and a plan takes seconds: two plans show that the sweep works."""
    wide = sampler_triton.WIDE
    if quick:
        return [(cap, 8, 8, wide, False) for cap in caps(default_cap)[-2:]]
    return [*((cap, sw, 8, wide, False) for cap, sw in itertools.product(caps(default_cap), STATS_WARPS)),
            *((default_cap, 8, xw, wide, False) for xw in SELECT_WARPS if xw != 8),
            *((default_cap, 8, 8, w, False) for w in WIDES), (default_cap, 8, 8, wide, True)]


def flat_logits(batch: int, vocab: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """bf16 rows of a random-weight model: N(0, 1.2²), about 11 nats at V = 152064."""
    return (1.2 * torch.randn(batch, vocab, generator=gen)).to(torch.bfloat16).to(device)


def measure(batch: SamplingBatch, plan: dict, device: torch.device, iters: int) -> dict:
    fast = torch.empty(batch.batch, dtype=torch.int64, device=device)
    path = torch.empty(batch.batch, dtype=torch.int64, device=device)
    tries = torch.empty(batch.batch, dtype=torch.int64, device=device)
    sampler_triton.sample(batch, fast_out=fast, path_out=path, tries_out=tries, **plan)
    ms = graph_time_ms(lambda: sampler_triton.sample(batch, **plan), device, iters)
    return dict(us=round(ms * 1e3, 2), fast_fraction=round(float(fast.float().mean()), 4),
                verified_fraction=round(float((path == 1).float().mean()), 4),
                proven_fraction=round(float((tries > 0).float().mean()), 4))


def main() -> None:
    args = quick_args(__doc__, "interpreted smoke run (automatic without CUDA)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    quick = device.type != "cuda"
    # B = 256 first: a GPU session gives the sweep 2 minutes, and the lane-local _stats matters most there
    batches, vocab, iters = ([1, 4], 4096, 1) if quick else ([256, 1, 32, 8], 152064, 50)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if not quick else 132
    bandwidth = copy_bandwidth(device) if not quick else None
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b in batches:
        logits = lm_logits(b, vocab, device, gen)
        pair = rast_pair(b, vocab, device, gen)
        batch = normalize(logits, [pair], weights=1.0, temperature=1.0, top_k=0, top_p=TOP_P, min_p=0.0,
                          seed=torch.arange(b, device=device))
        block, chunk, splits, default_cap = sampler_triton.launch_plan(b, vocab, None if quick else sms)
        floor_us = 3 * b * vocab * logits.element_size() / bandwidth * 1e6 if bandwidth else None
        flat = normalize(flat_logits(b, vocab, device, gen),
                         [(flat_logits(b, vocab, device, gen), flat_logits(b, vocab, device, gen))], weights=1.0,
                         temperature=1.0, top_k=0, top_p=TOP_P, min_p=0.0, seed=torch.arange(b, device=device))
        sweep = [("lm", batch, p) for p in plans(default_cap, quick)]
        default_plan = (default_cap, 8, 8, sampler_triton.WIDE, False)
        sweep += [("lm-search", batch, default_plan)]
        sweep += [(kind, flat, default_plan) for kind in ("flat", "flat-search")]
        uncut = None if quick else sampler_triton.launch_plan(b, vocab, sms, lane_tokens=None)[1]
        for kind, data, (cap, sw, xw, wide, long) in sweep:
            if long and uncut == chunk:
                continue  # the LANE_TOKENS cut left this batch size's plan as it was
            plan = dict(cap=None if long else cap, chunk=uncut if long else None,
                        warps=(sw, xw), wide=wide, verify=kind != "flat-search",
                        proof_tries=0 if kind == "lm-search" else sampler_triton.PROOF_TRIES)
            _, used_chunk, used_splits, used_cap = sampler_triton.launch_plan(b, vocab, None if quick else sms,
                                                                              chunk=plan["chunk"], cap=plan["cap"])
            row = dict(rows=kind, batch=b, vocab=vocab, chunk=used_chunk, splits=used_splits, cap=used_cap,
                       stats_warps=sw, select_warps=xw, wide=wide,
                       default=(cap, sw, xw, wide, long) == default_plan,
                       **measure(data, plan, device, iters))
            if floor_us:
                row.update(floor_us=round(floor_us, 2), time_over_floor=round(row["us"] / floor_us, 2))
            rows.append(row)
            print(table([row], list(row)), flush=True)
        if not quick:  # rewritten after every batch size, so a run cut off by its time limit keeps them
            write_results("sampler-plans", device, rows, out_dir=args.out, extra=dict(partial=True, sms=sms))
    best = [min((r for r in rows if r["batch"] == b and r["rows"] == "lm" and r["fast_fraction"] == 1.0),
                key=lambda r: r["us"], default=None) for b in batches]
    print(f"fused sampler launch plans | device: {device_name(device)} | commit: {git_sha()} | V={vocab} K=1 "
          f"T=1 top_p={TOP_P}{' | interpreted: the times mean nothing' if quick else ''}")
    print(table(rows, list(rows[0])))
    print("fastest plan per batch with every row on the fast path, against the default:")
    for b, r in zip(batches, best):
        default, lm_search, flat, search = (
            next(d for d in rows if d["batch"] == b and d["default"] and d["rows"] == kind)
            for kind in ("lm", "lm-search", "flat", "flat-search"))
        print(f"  B={b}: " + (f"chunk {r['chunk']}, cap {r['cap']}, warps {r['stats_warps']}/{r['select_warps']}, "
                              f"wide {r['wide']}: {r['us']} µs " if r else "none ") +
              f"(default {default['us']} µs, {lm_search['us']} µs searching the threshold first; "
              f"flat rows: verified draw {flat['us']} µs, "
              f"threshold search {search['us']} µs)")
    if args.out is not None or not quick:
        path = write_results("sampler-plans", device, rows, out_dir=args.out,
                             extra=dict(emulated=quick, top_p=TOP_P, temperature=1.0, sms=sms))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
