"""Helpers shared by the benchmarks in bench/: where and when a run happened, how fast this machine
copies memory (the floor every memory-bound kernel is measured against), timing, and the result
files bench/results/<name>-<device>-<shortsha>.json (+ .png when matplotlib is installed)."""
from __future__ import annotations

import gc
import argparse
import datetime
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def import_engine() -> Any:
    """rast_engine, also from a bare checkout (the GPU image has the repo but not the editable install):
    engine/ is then registered under its package name, never imported as ``engine``."""
    if importlib.util.find_spec("rast_engine") is None:
        spec = importlib.util.spec_from_file_location("rast_engine", ROOT / "engine" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "engine")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["rast_engine"] = module
        spec.loader.exec_module(module)
    import rast_engine

    return rast_engine


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' on CUDA, the CPU model (or 'cpu') otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def slug(text: str) -> str:
    """A file-name-safe short form: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "unknown"


def git_sha(short: bool = True) -> str:
    """The commit of the working tree, with '+dirty' if it has uncommitted changes; 'unknown' outside git.
    RAST_COMMIT overrides it: a copy of the tree without git metadata (the lent GPU machine) names its
    commit that way."""
    if os.environ.get("RAST_COMMIT"):
        return os.environ["RAST_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short" if short else "--verify", "HEAD"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def time_us(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 20) -> float:
    """Median wall time of fn() in microseconds: CUDA events around each call on GPU (with a cache
    flush in between, so inputs come from HBM, not L2), a plain perf_counter timer on CPU."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
        for _ in range(iters):
            flush.zero_()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(stop) * 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def quick_args(doc: str, quick_help: str,
               more: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> argparse.Namespace:
    """The flags of a suite that runs its full grid on CUDA and a smoke grid with --quick (or no CUDA);
    ``more`` adds the suite's own."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results)")
    if more is not None:
        more(parser)
    return parser.parse_args()


def graph_time_ms(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Mean milliseconds per call; on CUDA, back-to-back replays of a graph holding one call, so launch
    overhead is what the engine's captured decode step pays (inputs may sit in L2 between replays)."""
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


def device_profile(run: Callable[[], object], device: torch.device, calls: int, top: int = 15) -> dict:
    """torch.profiler over ``calls`` calls of ``run``: wall and busy ms per call, launches per call, and
    the ``top`` kernels (ops on a CPU) by self device time per call, each with its share of the busy time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            run()
        sync(device)
        wall = time.perf_counter() - t0
    averages = list(prof.key_averages())
    names = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
    key = next((n for n in names if averages and hasattr(averages[0], n)), names[-1])  # cuda -> device in 2.4+
    events = sorted((e for e in averages if getattr(e, key) > 0), key=lambda e: getattr(e, key), reverse=True)
    busy_us = sum(getattr(e, key) for e in events)
    kernels = [dict(name=e.key[:90], ms_per_step=getattr(e, key) / 1e3 / calls,
                    share=getattr(e, key) / busy_us, calls_per_step=e.count / calls) for e in events[:top]]
    return dict(wall_ms_per_step=wall * 1e3 / calls, busy_ms_per_step=busy_us / 1e3 / calls,
                launches_per_step=sum(e.count for e in events) / calls, time_kind=key, kernels=kernels)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """A dropped engine's device memory back to the driver before the next one is built (``del engine``
    frees it into torch's cache: engine/weak_callback.py; the collector runs for any cycle outside it)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def copy_bandwidth(device: torch.device, nbytes: int = 512 * 2**20) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted), the denominator of
    every 'floor'. On CPU a smaller buffer keeps the measurement quick."""
    if device.type != "cuda":
        nbytes = min(nbytes, 64 * 2**20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), device, warmup=2, iters=10)
    return 2 * nbytes / (us * 1e-6)


def pinned_bandwidth(device: torch.device, to_device: bool, nbytes: int = 256 * 2**20) -> float:
    """Measured copy bandwidth between pinned host memory and the (CUDA) device, one way, in bytes/s."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device=device)
    copy = (lambda: dev.copy_(host, non_blocking=True)) if to_device else (lambda: host.copy_(dev, non_blocking=True))
    return nbytes / (time_us(copy, device) * 1e-6)


def keeps_results(out: Path | None, device: torch.device, quick: bool) -> bool:
    """Whether a suite that measures on a CPU too writes its result file (docs/benchmarks.md): on a GPU,
    for a full run, or where --out is given; a --quick smoke run on a CPU writes none, whose file
    would take the name of a real CPU result at that commit."""
    return out is not None or device.type == "cuda" or not quick


def write_results(name: str, device: torch.device | str, rows: Sequence[dict], extra: dict | None = None,
                  out_dir: Path | None = None, commit: str | None = None) -> Path:
    """<out_dir or bench/results>/<name>-<device>-<shortsha>.json with device, commit, date, rows
    (+ extra fields). A long run passes the commit it read at its start, so a commit made while it runs
    does not rename its file between rewrites. ``device``: this machine's, or the name of the one that
    was measured (a remote server's)."""
    out_dir = RESULTS if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev, sha = device if isinstance(device, str) else device_name(device), commit or git_sha()
    path = out_dir / f"{name}-{slug(dev)}-{slug(sha)}.json"
    payload = {"device": dev, "commit": sha, "date": now(), **(extra or {}), "rows": list(rows)}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def plot(path: Path, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str,
         log: bool = True) -> Path | None:
    """Line plot of {label: [(x, y), ...]} next to the JSON file; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series = {label: points for label, points in series.items() if points and min(y for _, y in points) > 0}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=label)
    if log:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    out = path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain fixed-width text table of the given columns."""
    cells = [[str(c) for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in cells)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
