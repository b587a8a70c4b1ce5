"""Fused mixture-of-experts MLP (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE): each token's k routed experts'
gated MLPs, weighted by the router and summed,

    out[t] = Σ_j w[t, j] · down_e(silu(gate_e · x_t) · up_e · x_t),   e = ids[t, j].

Weights in HF's fused layout: gate_up [E, 2I, H] (expert e's gate rows, then its up rows), down [E, H, I],
in the activations' dtype or in FP8 (float8_e4m3fn with a float32 scale per output channel, converted
exactly in registers and scaled once after the dot, as rast_kernels.fp8_linear does).

Algorithm (device ops only, no host sync, so a decode step with it captures into a CUDA graph):
1. ``align`` (rast_kernels.moe_routing, one program): the P = T·k (token, slot) pairs are grouped by
   expert, and each expert's run is padded to a multiple of BLOCK_M, in a buffer sized for the worst case
   (P + min(E, P)·(BLOCK_M − 1) slots). Every BLOCK_M tile then belongs to one expert, ``tile_expert``
   (E past the last run: such a program returns at once).
2. gate/up kernel: a program per (tile, BLOCK_N intermediate columns) multiplies the tile's token rows by
   its expert's gate and up columns and writes silu(gate) · up to h [P, I].
3. down kernel: a program per (tile, BLOCK_N hidden columns) multiplies h's rows by the expert's down
   projection and the router weight, writing y [P, H].
4. sum kernel: a program per (token, BLOCK hidden columns) adds the token's k rows of y, in ascending
   expert order whatever the order of its ids.

Roundings are HF's, so a float32 model is exact to summation order and a bf16 one rounds where HF does:
gate and up outputs, the activation and the product round to the dtype; the down output rounds, then
its product with the router weight (in the dtype for Qwen and OLMoE, float32 for Mixtral: passed as
HF's router gives it) rounds; the k rows are added in ascending expert order, rounding after each add,
as HF's loop over experts with ``index_add_`` does.

Bytes: each routed expert's weights are read once per tile that holds it (at decode a tile a routed
expert, so B·k tokens read at most min(E, B·k) experts' 3·I·H weights), and the activations a few times
over from L2. ``fused_moe_torch`` is the executable spec.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from rast_kernels.fp8_cast import FP8
from rast_kernels.launch import cdiv, exact_fp_options, interpreting, next_pow2, require_launchable, sm_count
from rast_kernels.layer_ops_numerics import _dot, _round, _silu
from rast_kernels.moe_routing import align

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
           gate_up_scale: Optional[torch.Tensor], down_scale: Optional[torch.Tensor]) -> None:
    if x.dtype not in DTYPES or x.dim() != 2:
        raise ValueError(f"x must be [T, H] of one of {DTYPES}, got {x.dtype} {tuple(x.shape)}")
    t, h = x.shape
    if gate_up.dim() != 3 or gate_up.shape[2] != h or gate_up.shape[1] % 2 or \
            gate_up.dtype != (x.dtype if gate_up_scale is None else FP8):
        raise ValueError(f"gate_up must be [E, 2I, {h}] of x's dtype (float8_e4m3fn with gate_up_scale), got "
                         f"{gate_up.dtype} {tuple(gate_up.shape)}")
    e, i = gate_up.shape[0], gate_up.shape[1] // 2
    if down.shape != (e, h, i) or down.dtype != (x.dtype if down_scale is None else FP8):
        raise ValueError(f"down must be [{e}, {h}, {i}] of x's dtype (float8_e4m3fn with down_scale), got "
                         f"{down.dtype} {tuple(down.shape)}")
    for scale, shape in ((gate_up_scale, (e, 2 * i)), (down_scale, (e, h))):
        if scale is not None and (scale.shape != shape or scale.dtype != torch.float32):
            raise ValueError(f"an FP8 expert weight's scale must be float32 {list(shape)} (one per output channel), "
                             f"got {scale.dtype} {tuple(scale.shape)}")
    if ids.dim() != 2 or ids.shape[0] != t or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64 [{t}, k], got {ids.dtype} {tuple(ids.shape)}")
    if weights.shape != ids.shape or not weights.is_floating_point():
        raise ValueError(f"topk_weights must be floating [{t}, {ids.shape[1]}], got {weights.dtype} "
                         f"{tuple(weights.shape)}")
    if len({x.device, gate_up.device, down.device, ids.device, weights.device} |
           {a.device for a in (gate_up_scale, down_scale) if a is not None}) != 1:
        raise ValueError("x, gate_up, down, topk_ids and topk_weights must be on one device")


def _linear(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """x @ wᵀ in x's dtype; an FP8 w as fp8_linear computes it: (x @ w8ᵀ in float32) · scale, rounded once."""
    if scale is None:
        return torch.nn.functional.linear(x, w)
    return (torch.nn.functional.linear(x.float(), w.float()) * scale).to(x.dtype)


def fused_moe_torch(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor,
                    topk_weights: torch.Tensor, sync_free: Optional[bool] = None,
                    gate_up_scale: Optional[torch.Tensor] = None, down_scale: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """The spec, HF's loop over experts in plain torch. ``sync_free`` (default: off the CPU) runs every
    expert over every token, an unrouted token's term an exact zero, so no host sync; else only the
    routed experts run (their ids read on the host). Both give the same values."""
    _check(x, gate_up, down, topk_ids, topk_weights, gate_up_scale, down_scale)
    out = torch.zeros_like(x)
    sync_free = x.device.type != "cpu" if sync_free is None else sync_free
    experts = range(gate_up.shape[0]) if sync_free else topk_ids.unique().tolist()
    for e in experts:
        chosen = topk_ids == e  # a token routes to an expert at most once
        gate, up = _linear(x, gate_up[e], None if gate_up_scale is None else gate_up_scale[e]).chunk(2, dim=-1)
        y = _linear(torch.nn.functional.silu(gate) * up, down[e], None if down_scale is None else down_scale[e])
        y = y * (topk_weights * chosen).sum(-1, keepdim=True)  # one term non-zero: exact, in HF's dtype
        out = out + torch.where(chosen.any(-1, keepdim=True), y.to(x.dtype), 0)
    return out


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, s_ptr, pairs_ptr, tile_expert_ptr, h_ptr, P, E, I, H, stride_x, stride_we,
                    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    FP8_WEIGHTS: tl.constexpr, COMPILED: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert >= E:
        return
    pair = tl.load(pairs_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pair < P
    token = (pair // TOPK).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < I
    rk = tl.arange(0, BLOCK_K)
    w = w_ptr + expert.to(tl.int64) * stride_we
    gate_rows = rn.to(tl.int64)[None, :] * H
    up_rows = (rn + I).to(tl.int64)[None, :] * H
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = (k0 + rk) < H
        a = tl.load(x_ptr + token[:, None] * stride_x + (k0 + rk)[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w_ok = n_ok[None, :] & k_ok[:, None]
        w_gate = tl.load(w + gate_rows + (k0 + rk)[:, None], mask=w_ok, other=0.0)
        w_up = tl.load(w + up_rows + (k0 + rk)[:, None], mask=w_ok, other=0.0)
        if FP8_WEIGHTS:  # e4m3 is exact in every activation dtype
            w_gate, w_up = w_gate.to(a.dtype), w_up.to(a.dtype)
        acc_gate += _dot(a, w_gate, UPCAST, PRECISION)
        acc_up += _dot(a, w_up, UPCAST, PRECISION)
    if FP8_WEIGHTS:  # one scale per output channel, applied once: fp8_linear's rounding
        scales = s_ptr + expert.to(tl.int64) * 2 * I + rn
        acc_gate *= tl.load(scales, mask=n_ok, other=0.0)[None, :]
        acc_up *= tl.load(scales + I, mask=n_ok, other=0.0)[None, :]
    dtype = h_ptr.dtype.element_ty
    act = _round(_silu(_round(acc_gate, dtype), COMPILED), dtype)  # HF: silu(gate) * up, each op rounding
    h = _round(act * _round(acc_up, dtype), dtype)
    tl.store(h_ptr + pair.to(tl.int64)[:, None] * I + rn[None, :], h.to(dtype), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, s_ptr, pairs_ptr, tile_expert_ptr, weights_ptr, y_ptr, P, E, I, H, stride_we,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8_WEIGHTS: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert >= E:
        return
    pair = tl.load(pairs_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pair < P
    rows = pair.to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < H
    rk = tl.arange(0, BLOCK_K)
    w = w_ptr + expert.to(tl.int64) * stride_we + rn.to(tl.int64)[None, :] * I
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_ok = (k0 + rk) < I
        a = tl.load(h_ptr + rows[:, None] * I + (k0 + rk)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_down = tl.load(w + (k0 + rk)[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if FP8_WEIGHTS:
            w_down = w_down.to(a.dtype)
        acc += _dot(a, w_down, UPCAST, PRECISION)
    if FP8_WEIGHTS:
        acc *= tl.load(s_ptr + expert.to(tl.int64) * H + rn, mask=n_ok, other=0.0)[None, :]
    dtype = y_ptr.dtype.element_ty
    weight = tl.load(weights_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    y = _round(_round(acc, dtype) * weight[:, None], dtype)
    tl.store(y_ptr + rows[:, None] * H + rn[None, :], y.to(dtype), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_kernel(y_ptr, ids_ptr, out_ptr, E, H, TOPK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < H
    dtype = out_ptr.dtype.element_ty
    j = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_ptr + token * TOPK + j, mask=j < TOPK, other=-1).to(tl.int32)
    # (expert, slot) keys: each pass takes the next, so the slots go in ascending expert order (HF's loop
    # order) and each is read once; a slot past k, or an id outside [0, E) (align computed no row for it),
    # adds nothing
    keys = tl.where((j < TOPK) & (ids >= 0) & (ids < E), ids * BLOCK_K + j, 2**30)
    acc = tl.zeros([BLOCK], tl.float32)
    last = -1
    for _ in tl.static_range(TOPK):
        key = tl.min(tl.where(keys > last, keys, 2**30), axis=0)
        row = token * TOPK + key % BLOCK_K
        real = (offs * 0 + key) < 2**30  # a vector: the interpreter takes no scalar in a mask
        y = tl.load(y_ptr + row * H + offs, mask=ok & real, other=0.0).to(tl.float32)
        acc = tl.where(real, _round(acc + y, dtype), acc)
        last = key
    tl.store(out_ptr + token * H + offs, acc.to(dtype), mask=ok)


def plan(pairs: int, experts: int, n: int, dtype: torch.dtype, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for a GEMM of ``n`` output columns. Decode (few pairs an
    expert) takes tl.dot's fewest rows and narrows the column strip until the tiles that can hold pairs
    (at most min(E, P)) make two programs an SM, so the expert weights stream on every SM; prefill takes
    square tiles. fp32 (tests) and the interpreter take small tiles. Untuned: bench/moe.py times it."""
    if interpreting() or dtype == torch.float32:
        return 16, 32, 32, 4
    if pairs > 4 * experts:
        return 64, 128, 64, 8
    bn, tiles = 128, min(experts, pairs)
    while bn > 32 and tiles * cdiv(n, bn) < 2 * sms:
        bn //= 2
    return 16, bn, 128, 4


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor, backend: str = "triton", gate_up_scale: Optional[torch.Tensor] = None,
              down_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [T, H], gate_up [E, 2I, H], down [E, H, I], topk_ids [T, k] (experts in [0, E), distinct in a row as
    torch.topk gives them; the kernels add a repeat twice, as the spec does, and skip an id out of range,
    where the spec raises), topk_weights [T, k] -> [T, H] in x's dtype. ``backend``: "triton" or "torch".
    FP8 experts (quantization="fp8"): gate_up and down in float8_e4m3fn with float32 scales per output
    channel, gate_up_scale [E, 2I] and down_scale [E, H], applied as rast_kernels.fp8_linear applies them."""
    if torch.compiler.is_compiling():  # one opaque op when traced (rast_kernels.ops)
        from rast_kernels import ops
        return ops.traced(ops.fused_moe, x, gate_up, down, topk_ids, topk_weights, backend, gate_up_scale,
                          down_scale)
    if backend == "torch":
        return fused_moe_torch(x, gate_up, down, topk_ids, topk_weights, None, gate_up_scale, down_scale)
    if backend != "triton":
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    _check(x, gate_up, down, topk_ids, topk_weights, gate_up_scale, down_scale)
    require_launchable(x, "x")
    t, h = x.shape
    e, i, k = gate_up.shape[0], gate_up.shape[1] // 2, topk_ids.shape[1]
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)  # row-major whatever x's strides
    if t == 0 or k == 0:
        return out.zero_()
    x, gate_up, down = (a if a.stride(-1) == 1 else a.contiguous() for a in (x, gate_up, down))
    if gate_up.stride(1) != h or down.stride(1) != i:
        gate_up, down = gate_up.contiguous(), down.contiguous()
    p = t * k
    sms = sm_count(x.device)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    upcast = interpreting() and x.dtype == torch.bfloat16
    bm, bn, bk, warps = plan(p, e, i, x.dtype, sms)
    topk_ids, topk_weights = topk_ids.contiguous(), topk_weights.contiguous()
    pairs, tile_expert = align(topk_ids, e, bm)
    hidden = torch.empty(p, i, dtype=x.dtype, device=x.device)
    fp8 = gate_up_scale is not None
    _gate_up_kernel[(tile_expert.numel(), cdiv(i, bn))](
        x, gate_up, gate_up_scale.contiguous() if fp8 else x, pairs, tile_expert, hidden, p, e, i, h, x.stride(0),
        gate_up.stride(0), TOPK=k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, FP8_WEIGHTS=fp8, COMPILED=not interpreting(),
        UPCAST=upcast, PRECISION=precision, num_warps=warps, num_stages=3, **exact_fp_options())
    _, bn, bk, warps = plan(p, e, h, x.dtype, sms)  # the same BLOCK_M: the tiles of one alignment
    y = torch.empty(p, h, dtype=x.dtype, device=x.device)
    _down_kernel[(tile_expert.numel(), cdiv(h, bn))](
        hidden, down, down_scale.contiguous() if down_scale is not None else x, pairs, tile_expert, topk_weights, y,
        p, e, i, h, down.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, FP8_WEIGHTS=down_scale is not None,
        UPCAST=upcast, PRECISION=precision, num_warps=warps, num_stages=3, **exact_fp_options())
    block = min(1024, next_pow2(h))
    _sum_kernel[(t, cdiv(h, block))](y, topk_ids, out, e, h, TOPK=k, BLOCK_K=next_pow2(k), BLOCK=block,
                                     num_warps=4, **exact_fp_options())
    return out
