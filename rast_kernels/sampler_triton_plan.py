"""How the Triton sampler (rast_kernels.sampler_triton) is launched: the chunking of the vocabulary,
the candidates kept per chunk, warps, register caps and histogram buckets, from the shapes alone (never
from values, so a CUDA graph can capture the launches)."""
from __future__ import annotations

import torch

from rast_kernels.batch import SamplingBatch
from rast_kernels.launch import cdiv, interpreting, next_pow2

TILE = 4096  # candidates per row held in registers by _select (S * CAP <= TILE up to rounding)
# The most blocks a chunk spans on a GPU: each lane of _stats meets at most this many tokens and keeps 4, so
# longer chunks lose more of a wide nucleus to the summary (simulated and interpreted: docs/benchmarks.md,
# "_stats, statically"). Peaked rows are unaffected either way.
LANE_TOKENS = 24
STATS_WARPS = 8  # _stats' default num_warps


def launch_plan(rows: int, vocab: int, sms: int | None, block: int | None = None, chunk: int | None = None,
                cap: int | None = None, lane_tokens: int | None = LANE_TOKENS) -> tuple[int, int, int, int]:
    """(BLOCK, CHUNK, S, CAP) for ``rows`` rows on a GPU with ``sms`` SMs (None: the CPU interpreter):
    chunks are whole blocks; S chunks per row give about 4 programs per SM, and on a GPU at most
    ``lane_tokens`` blocks each (None: no such cut, for bench/sampler_plans.py); CAP (a power of two,
    candidates kept per chunk) fills a TILE-sized tile in _select. Any argument given is kept."""
    if block is None:
        block = 128 if interpreting() else 1024
    block = min(block, next_pow2(vocab))
    if chunk is None:
        if sms is None:
            splits = min(4, cdiv(vocab, block))
        else:
            splits = max(1, min(cdiv(4 * sms, rows), cdiv(vocab, block)))
            if lane_tokens is not None:
                splits = max(splits, cdiv(vocab, lane_tokens * block))
        chunk = cdiv(vocab, splits)
    chunk = cdiv(max(chunk, 1), block) * block
    splits = cdiv(vocab, chunk)
    if cap is None:
        cap = min(next_pow2(chunk), max(16, TILE // next_pow2(splits)))
    if cap < 1 or cap & (cap - 1):
        raise ValueError(f"cap (candidates per chunk) must be a power of two >= 1, got {cap}")
    return block, chunk, splits, cap


def _plan(batch: SamplingBatch, block: int | None, chunk: int | None, cap: int | None) -> tuple[int, int, int, int]:
    dev = batch.logits.device
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else None
    return launch_plan(batch.batch, batch.vocab, sms, block, chunk, cap)


def _warps(warps: int | None, default: int | None) -> dict:
    """The num_warps launch option: none under the interpreter (it runs one program as whole arrays)."""
    if warps is not None and (warps < 1 or warps & (warps - 1)):
        raise ValueError(f"num_warps must be a power of two >= 1, got {warps}")
    chosen = default if warps is None else warps
    return {} if interpreting() or chosen is None else {"num_warps": chosen}


def stats_maxnreg(warps: int) -> int:
    """_stats' register cap: two programs of ``warps`` warps share an SM's 64K registers. Uncapped, ptxas
    gave it 133 at 8 warps, as the launcher specialises it (aligned rows), which leaves one; capped at
    128 it spills nothing (bench/sass_loops.py)."""
    return min(255, 65536 // (2 * 32 * warps))


def _stats_options(warps: int | None) -> dict:
    """_stats' launch options: num_warps and the register cap; none under the interpreter."""
    options = _warps(warps, STATS_WARPS)
    return {**options, "maxnreg": stats_maxnreg(options["num_warps"])} if options else {}


def _buckets(nb: int | None) -> int:
    if nb is None:  # the interpreter pays per operation, not per element: fewer, wider passes
        nb = 256 if interpreting() else 16
    if nb < 4 or nb & (nb - 1):
        raise ValueError(f"nb (histogram buckets) must be a power of two >= 4, got {nb}")
    return nb


def _hist_block(block: int) -> int:
    """The descent's block: one token per thread of _select's 8 warps keeps its [BLOCK, NB] partials in
    registers."""
    return block if interpreting() else min(256, block)
