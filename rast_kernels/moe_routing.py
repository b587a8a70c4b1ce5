"""The routing half of a sparse layer (rast_kernels.moe), one launch a step each, because at decode a
layer's routing is a few dozen numbers and every launch, not every byte, is what it costs: Qwen3-30B-A3B
has 48 sparse layers, and the torch ops these replace were about 20 launches a layer.

- ``moe_route``: router logits [T, E] -> (ids [T, k], weights [T, k]) as HF's routers give them: softmax
  in float32, the k most probable experts, their probabilities renormalised to sum to 1 where asked,
  stored in the model dtype (Mixtral: float32). One program a token. The experts are chosen by logit
  (softmax is monotonic, so they are the k most probable) and a tie goes to the lower id; each row lists
  its experts in ascending id order, the order HF adds their outputs in.
- ``align``: ids -> (pairs, tile_expert) for the expert GEMMs, in one program at decode sizes (a stable
  sort in torch ops past them): count each expert's pairs, pad each run to a multiple of BLOCK_M, and
  give every pair a slot in its expert's run by an atomic cursor. A run's order varies from launch to
  launch; the results do not, since each row of a tile is computed on its own and written by pair index.
  The layout bound is from shapes alone (``slots``), so no host sync.

``moe_route_torch`` and ``align_torch`` are the executable specs (the latter sorts the pairs stably).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from rast_kernels.launch import cdiv, exact_fp_options, interpreting, next_pow2, require_launchable
from rast_kernels.layer_ops_numerics import _round


ONE_PROGRAM_PAIRS = 4096  # align's one program takes a decode batch's pairs (256 tokens x k = 16) in 32 rounds


def slots(pairs: int, experts: int, block_m: int) -> int:
    """The padded layout's length: every pair, plus up to block_m - 1 padding in each expert run that can
    be non-empty (at most min(E, pairs) of them), rounded up to whole tiles."""
    return cdiv(pairs + min(experts, pairs) * (block_m - 1), block_m) * block_m


def moe_route_torch(logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's router (Qwen3-MoE's, OLMoE's, Mixtral's): (ids, weights in ``dtype``), most probable first."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights.to(dtype)


@triton.jit
def _route_kernel(logits_ptr, stride_l, ids_ptr, weights_ptr, E, TOPK: tl.constexpr, BLOCK_E: tl.constexpr,
                  RENORMALIZE: tl.constexpr, COMPILED: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    ok = e < E
    logits = tl.load(logits_ptr + token * stride_l + e, mask=ok, other=float("-inf")).to(tl.float32)
    top = tl.max(logits, axis=0)
    if COMPILED:  # torch's expf, not ex2.approx
        exps = tl.where(ok, libdevice.exp(logits - top), 0.0)
    else:
        exps = tl.where(ok, tl.exp(logits - top), 0.0)
    if COMPILED:  # IEEE division, as torch's (Triton's "/" compiles to div.full, 2 ulp)
        probs = tl.math.div_rn(exps, tl.zeros_like(exps) + tl.sum(exps, axis=0))
    else:
        probs = exps / tl.sum(exps, axis=0)
    chosen = e < 0
    for _ in tl.static_range(TOPK):
        free = ok & (chosen == 0)
        best = tl.max(tl.where(free, logits, float("-inf")), axis=0)
        pick = tl.min(tl.where(free & (logits == best), e, BLOCK_E), axis=0)
        pick = tl.where(pick < BLOCK_E, pick, tl.min(tl.where(free, e, BLOCK_E), axis=0))  # NaN logits: any free
        chosen = chosen | (e == pick)
    weights = tl.where(chosen, probs, 0.0)
    if RENORMALIZE and COMPILED:
        weights = tl.math.div_rn(weights, tl.zeros_like(weights) + tl.sum(weights, axis=0))
    elif RENORMALIZE:
        weights = weights / tl.sum(weights, axis=0)
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1  # ascending expert ids
    dtype = weights_ptr.dtype.element_ty
    tl.store(ids_ptr + token * TOPK + slot, e, mask=chosen)
    tl.store(weights_ptr + token * TOPK + slot, _round(weights, dtype).to(dtype), mask=chosen)


def moe_route(logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T, k] int32 in ascending order, weights [T, k] in ``dtype``) of router logits [T, E]."""
    if torch.compiler.is_compiling():  # one opaque op when traced (rast_kernels.ops)
        from rast_kernels import ops
        return ops.traced(ops.moe_route, logits, top_k, renormalize, dtype)
    if logits.dim() != 2 or not logits.is_floating_point() or not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"logits must be floating [T, E] with 1 <= top_k <= E, got {logits.dtype} "
                         f"{tuple(logits.shape)} and top_k={top_k}")
    require_launchable(logits, "logits")
    t, e = logits.shape
    ids = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    weights = torch.empty(t, top_k, dtype=dtype, device=logits.device)
    if t:
        logits = logits if logits.stride(1) == 1 else logits.contiguous()
        _route_kernel[(t,)](logits, logits.stride(0), ids, weights, e, TOPK=top_k, BLOCK_E=next_pow2(e),
                            RENORMALIZE=renormalize, COMPILED=not interpreting(), num_warps=4, **exact_fp_options())
    return ids, weights


def align_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec: (pairs [slots] int32, the pair indices t·k + j sorted stably by expert, each expert's run
    padded with P; tile_expert [slots / block_m] int32, each tile's expert, num_experts past the runs)."""
    flat = topk_ids.reshape(-1).long()
    p = flat.numel()
    n = slots(p, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    sorted_expert = flat[order]
    rank = torch.arange(p, device=flat.device) - (counts.cumsum(0) - counts)[sorted_expert]
    pairs = torch.full((n,), p, dtype=torch.int32, device=flat.device)
    pairs[(padded_end - padded)[sorted_expert] + rank] = order.int()
    tile_expert = torch.searchsorted(padded_end, torch.arange(0, n, block_m, device=flat.device), right=True)
    return pairs, tile_expert.int()


@triton.jit
def _align_kernel(ids_ptr, scratch_ptr, pairs_ptr, tile_expert_ptr, P, E, SLOTS, BLOCK_M: tl.constexpr,
                  BLOCK_E: tl.constexpr, SEARCH_STEPS: tl.constexpr, CHUNK: tl.constexpr):
    e = tl.arange(0, BLOCK_E)
    counts_ptr, cursor_ptr, end_ptr = scratch_ptr, scratch_ptr + BLOCK_E, scratch_ptr + 2 * BLOCK_E
    tl.store(counts_ptr + e, tl.zeros([BLOCK_E], tl.int32))
    tl.debug_barrier()
    for start in range(0, P, CHUNK):  # an id outside [0, E) is no expert's: never counted nor written
        i = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + i, mask=i < P, other=0)
        tl.atomic_add(counts_ptr + ids, 1, mask=(i < P) & (ids >= 0) & (ids < E))
    tl.debug_barrier()
    counts = tl.load(counts_ptr + e)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    tl.store(cursor_ptr + e, end - padded)
    tl.store(end_ptr + e, end)
    tl.debug_barrier()
    for start in range(0, SLOTS, CHUNK):
        s = start + tl.arange(0, CHUNK)
        tl.store(pairs_ptr + s, tl.zeros([CHUNK], tl.int32) + P, mask=s < SLOTS)
    for start in range(0, SLOTS // BLOCK_M, CHUNK):  # a tile's expert: how many runs end at or before it
        tile = start + tl.arange(0, CHUNK)
        lo = tl.zeros([CHUNK], tl.int32)
        hi = lo + E
        for _ in tl.static_range(SEARCH_STEPS):  # the runs' ends never decrease: binary search
            mid = (lo + hi) // 2
            right = (lo < hi) & (tl.load(end_ptr + mid, mask=lo < hi, other=0) <= tile * BLOCK_M)
            hi = tl.where((lo < hi) & (right == 0), mid, hi)
            lo = tl.where(right, mid + 1, lo)
        tl.store(tile_expert_ptr + tile, lo, mask=tile < SLOTS // BLOCK_M)
    tl.debug_barrier()
    for start in range(0, P, CHUNK):
        i = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + i, mask=i < P, other=0)
        expert = (i < P) & (ids >= 0) & (ids < E)
        slot = tl.atomic_add(cursor_ptr + ids, 1, mask=expert)
        tl.store(pairs_ptr + slot, i, mask=expert)


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """align_torch's layout in one launch (each run's order may differ; see the module docstring). Past
    ONE_PROGRAM_PAIRS (prefill), align_torch's sort, whose dozen launches each use the whole GPU, where one
    program would loop over the pairs for milliseconds a layer."""
    require_launchable(topk_ids, "topk_ids")
    flat = topk_ids.reshape(-1)
    p, n = flat.numel(), slots(flat.numel(), num_experts, block_m)
    if p > ONE_PROGRAM_PAIRS:
        return align_torch(topk_ids, num_experts, block_m)
    block_e = next_pow2(num_experts)
    scratch = torch.empty(3 * block_e, dtype=torch.int32, device=flat.device)
    pairs = torch.empty(n, dtype=torch.int32, device=flat.device)
    tile_expert = torch.empty(n // block_m, dtype=torch.int32, device=flat.device)
    _align_kernel[(1,)](flat, scratch, pairs, tile_expert, p, num_experts, n, BLOCK_M=block_m, BLOCK_E=block_e,
                        SEARCH_STEPS=block_e.bit_length() + 1, CHUNK=128, num_warps=4)
    return pairs, tile_expert
