"""Whole-step CUDA graphs for decode: every model's forward, compute_logits and the rast_sample call,
captured once per batch-size bucket and replayed on batches padded up to their bucket.

A step is captured in stages, a graph each, replayed back to back: the decode step's forward (every
model, up to the logits in the runner's static buffers), then its sampler. A batch whose draws adjust
the logits first (logit_bias, penalties, masks, structured outputs: logit_adjust.py) replays the forward
alone and adjusts and samples eagerly, so it keeps the graph for what costs the launches: the models.

Invariants:
- the step reads only DecodeBuffers' static device tensors (inputs and sampling parameters), which
  the runner fills before each replay, and a stage reads what the earlier ones left in them; their
  addresses never change;
- every bucket is captured when the runner is built (capture_all), so no serving step pays for
  compiling or capturing; ``ensure`` stays as a guard for a bucket that is somehow missing. A capture
  first sets every row to inert padding (slot -1, context 0, greedy): the warm-up run before it (which
  compiles the Triton kernels for these shapes and initialises cuBLAS) therefore writes no KV slot, and
  capture itself executes nothing. Because it overwrites the static inputs, a capture never runs
  between the runner's fill and its replay;
- batches above the largest bucket (``cuda_graph_max_batch``) run the same step eagerly on their rows;
- all graphs share one memory pool, captured largest bucket first so the smaller graphs fit in the
  blocks the largest one reserved. That is safe because graphs never run concurrently and each replay's
  outputs (its ids, and the logits in the runner's static buffers, which every bucket shares) are
  consumed before the next replay; a later stage's outputs may lie in an earlier stage's scratch, which
  that stage's next replay overwrites, so the same rule covers them;
- the forward may fork onto the model-streams side stream; it joins back before its stage ends, as
  capture requires.
Prefill (varlen, data-dependent shapes) is never captured. A speculating engine captures its rounds the
same way, in one stage (ModelRunner.round_graphs: the step is a whole round, engine/speculative/round.py).
"""
from __future__ import annotations

import bisect
import logging
import time
from typing import Any, Callable, Optional, Sequence

import torch

from rast_engine.weak_callback import weak_method

logger = logging.getLogger("rast")

StepOutput = tuple[torch.Tensor, list[torch.Tensor]]  # (sampled ids [rows], logits of every model [rows, V_m])
SMALL_BUCKETS = (1, 2, 4, 8)
# attention backends whose decode path has no host sync (TorchAttention reads lengths on the host)
CAPTURE_SAFE_ATTENTION = ("triton", "flash_attn")
# ... whose prefill path has none either: a speculative round's verify is a prefill over the cache, and
# FlashAttention's prefill picks its kernel by comparing lengths on the host
CAPTURE_SAFE_PREFILL = ("triton",)
BUCKET_STEP = 16


def capture_safe(attention: str, speculative: bool) -> bool:
    """Whether an engine's graphs can capture attention backend ``attention``: decode steps need its
    decode path free of host syncs, speculative rounds its prefill path too."""
    return attention in (CAPTURE_SAFE_PREFILL if speculative else CAPTURE_SAFE_ATTENTION)


def batch_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16, and max_rows itself: padding wastes at most 15 rows (or half
    of a batch below 8), for about max_rows / 16 graphs."""
    out = {b for b in SMALL_BUCKETS if b < max_rows}
    out.update(range(BUCKET_STEP, max_rows, BUCKET_STEP))
    out.add(max_rows)
    return sorted(out)


def pick_bucket(buckets: Sequence[int], rows: int) -> Optional[int]:
    """The smallest bucket that holds ``rows`` rows, or None when none does (that batch runs eagerly)."""
    i = bisect.bisect_left(buckets, rows)
    return buckets[i] if i < len(buckets) else None


Stage = Callable[[int], Any]


class DecodeGraphs:
    def __init__(self, stages: Sequence[Stage], pad_all: Callable[[int], None],
                 device: torch.device, max_rows: int) -> None:
        """``stages``: the step in order, each ``stage(rows)`` run on the first ``rows`` static rows;
        ``pad_all(rows)`` makes those rows inert padding on the device."""
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        if not stages:
            raise ValueError("a step needs at least one stage")
        # the runner holds its graphs: its stages are held weakly (weak_callback.py)
        self.stages, self.pad_all, self.device = tuple(map(weak_method, stages)), weak_method(pad_all), device
        self.buckets = batch_buckets(max_rows)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.outputs: dict[int, list[Any]] = {}  # per bucket, each stage's output
        self.pool = None  # the first capture's pool, shared by every later one
        self.stream = torch.cuda.Stream(device)

    def bucket(self, rows: int) -> Optional[int]:
        return pick_bucket(self.buckets, rows)

    def capture_all(self) -> None:
        """Capture every bucket, largest first (see the pool invariant above)."""
        t0 = time.perf_counter()
        for rows in reversed(self.buckets):
            self.ensure(rows)
        logger.info("captured %d decode graphs (batch buckets %d..%d, %d stages) in %.2f s", len(self.buckets),
                    self.buckets[0], self.buckets[-1], len(self.stages), time.perf_counter() - t0)

    def release(self) -> None:
        """Drop every bucket's graphs and their pool (the engine's sleep: the tensors they read move);
        capture_all() captures them again."""
        self.graphs.clear()
        self.outputs.clear()
        self.pool = None

    def ensure(self, rows: int) -> None:
        """Capture the graphs of bucket ``rows`` if they do not exist yet (overwrites the static inputs)."""
        if rows in self.graphs:
            return
        t0 = time.perf_counter()
        self.pad_all(rows)
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            for stage in self.stages:
                stage(rows)  # warm-up: compiles and initialises outside capture
        current.wait_stream(self.stream)
        graphs, outputs = [], []
        for stage in self.stages:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                outputs.append(stage(rows))
            if self.pool is None:
                self.pool = graph.pool()
            graphs.append(graph)
        self.graphs[rows], self.outputs[rows] = graphs, outputs
        logger.debug("captured the decode graphs of batch bucket %d in %.2f s", rows, time.perf_counter() - t0)

    def replay(self, rows: int, stages: Optional[int] = None) -> Any:
        """Run bucket ``rows``'s first ``stages`` stages (None: all) on the static inputs as they are now;
        the last one's output, overwritten by the next replay of any bucket."""
        count = len(self.stages) if stages is None else stages
        for graph in self.graphs[rows][:count]:
            graph.replay()
        return self.outputs[rows][count - 1]
