"""`rast eval --data-parallel-size N`: N engines, each in a process of its own (worker r on GPU r), taking
problems from one shared queue, so whichever worker has room takes the next and a slow problem holds
up no other worker. The parent alone writes samples.jsonl.

A sample's seed is a function of (seed, problem id, sample index) only (sampling.request_seed), so the
samples are those one engine draws, whichever worker draws them, and a resume may use another N.
A worker that fails stops the run with its traceback; what the others saved stays, and a rerun resumes.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable

from rast_engine.errors import RastError
from rast_engine.evaluation.runner import EvalConfig
from rast_engine.evaluation.sampling import Item, sample

POLL_SECONDS = 1.0
DRAIN_SECONDS = 5.0  # how long a worker found dead may still have its last messages in the pipe


def worker_devices(device: str, n: int) -> list[str]:
    """Worker r's device: cuda:r on a GPU machine ("auto" or "cuda"), the CPU for every worker on "cpu"."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return ["cpu"] * n
    if device != "cuda":
        raise RastError(f"--data-parallel-size {n} puts worker r on cuda:r; give --device cuda, auto or cpu, "
                        f"not {device!r}")
    have = torch.cuda.device_count()
    if have < n:
        raise RastError(f"--data-parallel-size {n} needs {n} GPUs, one a worker; this machine has {have}")
    return [f"cuda:{r}" for r in range(n)]


def _worker(rank: int, cfg: EvalConfig, device: str, tasks: Any, results: Any) -> None:
    try:
        if device == "cpu":  # the workers share the cores
            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.data_parallel_size))
        one = dataclasses.replace(cfg, device=device, data_parallel_size=1)
        ended = False

        def next_item() -> Item | None:  # None from the end mark on, which is taken once: one a worker
            nonlocal ended
            item = None if ended else tasks.get()
            ended = item is None
            return item
        sample(one, next_item, lambda v, records: results.put(("records", v, records)))
        results.put(("done", rank))
    except BaseException:  # noqa: BLE001 - reported to the parent, which stops the run
        results.put(("error", rank, traceback.format_exc()))


def sample_in_parallel(cfg: EvalConfig, todo: list[Item], save: Callable[[int, list[dict[str, Any]]], None]) -> None:
    n = cfg.data_parallel_size
    devices = worker_devices(cfg.device, n)
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    tasks, results = ctx.Queue(), ctx.Queue()
    for item in todo:
        tasks.put(item)
    for _ in range(n):
        tasks.put(None)  # one end mark a worker
    # room for a fair share at most: the first worker to load must not take every problem of a short list
    cfg = dataclasses.replace(cfg, max_inflight=min(cfg.max_inflight, -(-len(todo) // n)))
    procs = [ctx.Process(target=_worker, args=(r, cfg, devices[r], tasks, results), daemon=True) for r in range(n)]
    for p in procs:
        p.start()
    running = set(range(n))

    def handle(msg: tuple) -> None:
        if msg[0] == "records":
            save(msg[1], msg[2])
        elif msg[0] == "done":
            running.discard(msg[1])
        else:
            raise RastError(f"data-parallel worker {msg[1]} ({devices[msg[1]]}) failed; the samples saved so far "
                            f"stay, and a rerun resumes:\n{msg[2]}")

    try:
        while running:
            try:
                handle(results.get(timeout=POLL_SECONDS))
                continue
            except queue.Empty:
                pass
            dead = [r for r in running if not procs[r].is_alive()]
            deadline = time.monotonic() + DRAIN_SECONDS
            while any(r in running for r in dead) and time.monotonic() < deadline:
                try:  # a worker that exited may still have its last messages in the pipe
                    handle(results.get(timeout=0.2))
                except queue.Empty:
                    pass
            gone = [r for r in dead if r in running]
            if gone:
                raise RastError(f"data-parallel worker {gone[0]} ({devices[gone[0]]}) died with exit code "
                                f"{procs[gone[0]].exitcode}; the samples saved so far stay, and a rerun resumes")
    finally:
        tasks.cancel_join_thread()  # problems no worker took must not hold this process's exit
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
