"""rast_kernels.moe: the fused mixture-of-experts MLP. Oracle: each token's routed experts computed one
by one in float64 and summed with their weights; the Triton kernels (interpreted on the CPU, native
under the gpu marker) and the torch spec must match it to the dtype's rounding, and each other."""
from __future__ import annotations

import pytest
import torch

from rast_kernels.moe import fused_moe, fused_moe_torch
from rast_kernels.moe_routing import align, align_torch, moe_route, moe_route_torch

HAS_CUDA = torch.cuda.is_available()
_interp = pytest.mark.skipif(HAS_CUDA, reason="with CUDA the kernels compile natively instead")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = [pytest.param("cpu", marks=_interp, id="interp"), pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]
# (tokens, experts, k, hidden, intermediate): decode-sized, prefill-sized with several tiles an expert,
# every expert a token, one expert, widths no tile divides
SHAPES = [(1, 8, 2, 64, 32), (40, 4, 2, 48, 40), (7, 6, 6, 32, 16), (5, 1, 1, 32, 24), (3, 16, 4, 80, 48)]


def problem(t: int, e: int, k: int, h: int, i: int, dtype: torch.dtype, device: str, seed: int = 0,
            fp32_weights: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    gate_up, down = torch.randn(e, 2 * i, h, generator=g) * h ** -0.5, torch.randn(e, h, i, generator=g) * i ** -0.5
    probs = torch.randn(t, e, generator=g).softmax(-1)
    weights, ids = torch.topk(probs, k)
    weights = weights if fp32_weights else weights.to(dtype)
    return tuple(a.to(device) for a in (x.to(dtype), gate_up.to(dtype), down.to(dtype), ids, weights))


def oracle(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
           weights: torch.Tensor) -> torch.Tensor:
    """float64, token by token, from the inputs as stored."""
    x, gate_up, down, weights = (a.double().cpu() for a in (x, gate_up, down, weights))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            out[t] += weights[t, j] * (down[e] @ (torch.nn.functional.silu(gate) * up))
    return out


def tolerance(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """float32: accumulation error; 16-bit: the roundings of h, the expert outputs and the running sum."""
    scale = ref.abs().max().item() + 1.0
    return {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype] * scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_moe_matches_float64_oracle_and_the_spec(shape: tuple, dtype: torch.dtype, device: str) -> None:
    args = problem(*shape, dtype, device)
    want = oracle(*args)
    got = fused_moe(*args)
    spec = fused_moe_torch(*args)
    assert got.dtype == dtype and got.shape == args[0].shape
    tol = tolerance(dtype, want)
    assert (got.double().cpu() - want).abs().max().item() <= tol
    assert (spec.double().cpu() - want).abs().max().item() <= tol
    # both round where HF does: equal up to float32 accumulation order before each rounding
    assert (got.float() - spec.float()).abs().max().item() <= (2e-5 if dtype == torch.float32 else tol / 4)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_router_weights_as_mixtral_passes_them(device: str) -> None:
    """Weights in float32 multiply the rounded expert output before it rounds again: no bf16 weight."""
    args = problem(6, 4, 2, 32, 16, torch.bfloat16, device, seed=3, fp32_weights=True)
    assert args[4].dtype == torch.float32
    want = oracle(*args)
    got, spec = fused_moe(*args), fused_moe_torch(*args)
    assert (got.double().cpu() - want).abs().max().item() <= tolerance(torch.bfloat16, want)
    assert (got.float() - spec.float()).abs().max().item() <= tolerance(torch.bfloat16, want) / 4


def test_spec_sync_free_loop_equals_the_routed_loop() -> None:
    """The loop over every expert (CUDA's, no host sync) gives the routed-only loop's values exactly."""
    for dtype in DTYPES.values():
        args = problem(9, 8, 2, 32, 16, dtype, "cpu", seed=5)
        assert torch.equal(fused_moe_torch(*args, sync_free=True), fused_moe_torch(*args, sync_free=False))


def check_layout(ids: torch.Tensor, e: int, block_m: int, pairs: torch.Tensor, tile_expert: torch.Tensor) -> None:
    """Every pair in one slot of its expert's run; each tile one expert's; tiles past the runs empty."""
    p = ids.numel()
    assert pairs.numel() == tile_expert.numel() * block_m >= p
    assert pairs.numel() <= p + min(e, p) * (block_m - 1) + block_m  # the shape-only bound, rounded to tiles
    real = pairs[pairs < p]
    assert sorted(real.tolist()) == list(range(p))  # every pair once
    flat = ids.reshape(-1).long()
    for tile, expert in enumerate(tile_expert.tolist()):
        rows = pairs[tile * block_m:(tile + 1) * block_m]
        rows = rows[rows < p]
        if expert == e:
            assert rows.numel() == 0  # past the runs: nothing to compute
        else:
            assert rows.numel() > 0 and (flat[rows.long()] == expert).all()
    assert set(tile_expert.tolist()) - {e} == set(flat.tolist())  # an unrouted expert has no tile


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_gives_each_tile_one_expert_and_each_pair_one_slot(block_m: int, device: str) -> None:
    g = torch.Generator().manual_seed(1)
    # several CHUNKs of pairs; E past 256; past ONE_PROGRAM_PAIRS (prefill: the torch sort)
    for t, e, k in ((23, 9, 3), (300, 64, 8), (5, 300, 2), (520, 16, 8)):
        perms = [torch.randperm(e, generator=g) for _ in range(t)]
        # expert 4 first in ten rows: more pairs than a tile holds
        ids = torch.stack([(torch.cat([torch.tensor([4]), q[q != 4]]) if r < 10 else q)[:k]
                           for r, q in enumerate(perms)]).to(device)
        spec = align_torch(ids, e, block_m)
        check_layout(ids.cpu(), e, block_m, *(a.cpu() for a in spec))
        got = align(ids, e, block_m)
        check_layout(ids.cpu(), e, block_m, *(a.cpu() for a in got))
        assert torch.equal(got[1], spec[1])  # the same tiles; only the order inside a run may differ
        for tile in range(spec[1].numel()):
            run = slice(tile * block_m, (tile + 1) * block_m)
            assert sorted(got[0][run].tolist()) == sorted(spec[0][run].tolist())
        real = spec[0][spec[0] < ids.numel()].long().cpu()
        assert torch.equal(real, ids.reshape(-1).cpu().argsort(stable=True))  # the spec: a stable sort


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_route_is_hfs_router_in_ascending_expert_order(renormalize: bool, dtype: torch.dtype, device: str) -> None:
    """The same experts as softmax + topk (+ renormalise), listed by id, with their weights in the asked
    dtype (float32 too: Mixtral's), within float32 rounding of torch's."""
    g = torch.Generator().manual_seed(2)
    for t, e, k in ((9, 8, 2), (3, 60, 4), (4, 128, 8), (2, 5, 5)):
        logits = (torch.randn(t, e, generator=g) * 3).to(dtype).to(device)
        for out in (dtype, torch.float32):
            ids, weights = moe_route(logits, k, renormalize, out)
            want_ids, want_w = moe_route_torch(logits, k, renormalize, out)
            order = want_ids.argsort(dim=1)
            assert ids.dtype == torch.int32 and weights.dtype == out
            assert torch.equal(ids.long(), want_ids.gather(1, order))
            torch.testing.assert_close(weights.float(), want_w.gather(1, order).float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_route_ties_and_non_finite_logits(device: str) -> None:
    """Equal logits go to the lower expert id; a NaN row still names k distinct experts (its weights NaN,
    as HF's would be); no tokens gives empty outputs."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [float("nan")] * 5], device=device)
    ids, weights = moe_route(logits, 2, True, torch.float32)
    assert ids[0].tolist() == [1, 2] and torch.allclose(weights[0].cpu(), torch.tensor([0.5, 0.5]))
    assert len(set(ids[1].tolist())) == 2 and weights[1].isnan().all()
    ids, weights = moe_route(logits[:0], 2, True, torch.float32)
    assert ids.shape == weights.shape == (0, 2)
    with pytest.raises(ValueError, match="top_k"):
        moe_route(logits, 6, True, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_no_tokens_and_rows_routed_to_one_expert(device: str) -> None:
    x, gate_up, down, ids, weights = problem(0, 4, 2, 32, 16, torch.float32, device)
    assert fused_moe(x, gate_up, down, ids, weights).shape == (0, 32)
    x, gate_up, down, ids, weights = problem(37, 4, 2, 32, 16, torch.float32, device, seed=2)
    ids = torch.stack([torch.full_like(ids[:, 0], 3), torch.full_like(ids[:, 0], 1)], dim=1)  # 37 rows each
    got = fused_moe(x, gate_up, down, ids, weights)
    assert (got.double().cpu() - oracle(x, gate_up, down, ids, weights)).abs().max() <= 2e-5 * got.abs().max()


def test_bad_inputs_are_refused_by_name() -> None:
    x, gate_up, down, ids, weights = problem(3, 4, 2, 32, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="gate_up"):
        fused_moe(x, gate_up[:, :-1], down, ids, weights)
    with pytest.raises(ValueError, match="down"):
        fused_moe(x, gate_up, down.transpose(1, 2), ids, weights)
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe(x, gate_up, down, ids.float(), weights)
    with pytest.raises(ValueError, match="topk_weights"):
        fused_moe(x, gate_up, down, ids, weights[:, :1])
    with pytest.raises(ValueError, match="x must be"):
        fused_moe(x.double(), gate_up, down, ids, weights)
    with pytest.raises(ValueError, match="backend"):
        fused_moe(x, gate_up, down, ids, weights, backend="cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_give_a_row_major_output(device: str) -> None:
    """A transposed x (column-major [T, H]) and strided weights: the output is [T, H] row-major either way."""
    x, gate_up, down, ids, weights = problem(5, 4, 2, 32, 16, torch.float32, device, seed=4)
    want = fused_moe_torch(x, gate_up, down, ids, weights)
    x_t = x.t().contiguous().t()  # the same values, strides (1, T)
    got = fused_moe(x_t, gate_up.transpose(1, 2).contiguous().transpose(1, 2), down, ids, weights)
    assert got.stride() == (32, 1)
    assert (got - want).abs().max().item() <= 2e-5 * (want.abs().max().item() + 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_fp8_experts_match_the_oracle_on_their_dequantised_weights(dtype: torch.dtype, device: str) -> None:
    """FP8 experts with a float32 scale per output channel: the kernels and the spec compute what the
    float64 oracle computes from the dequantised weights, to the dtype's rounding."""
    from rast_kernels.fp8_linear import dequantize_fp8, quantize_fp8

    x, gate_up, down, ids, weights = problem(9, 6, 2, 48, 40, dtype, device, seed=8)
    (gu8, gus), (dn8, dns) = ([torch.stack(t) for t in zip(*(quantize_fp8(w.float()) for w in ws))]
                              for ws in (gate_up, down))
    want = oracle(x, torch.stack([dequantize_fp8(w, s) for w, s in zip(gu8, gus)]),
                  torch.stack([dequantize_fp8(w, s) for w, s in zip(dn8, dns)]), ids, weights)
    got = fused_moe(x, gu8, dn8, ids, weights, gate_up_scale=gus, down_scale=dns)
    spec = fused_moe_torch(x, gu8, dn8, ids, weights, gate_up_scale=gus, down_scale=dns)
    tol = tolerance(dtype, want)
    assert (got.double().cpu() - want).abs().max().item() <= tol
    assert (got.float() - spec.float()).abs().max().item() <= (2e-5 if dtype == torch.float32 else tol / 4)
    with pytest.raises(ValueError, match="gate_up"):
        fused_moe(x, gu8, dn8, ids, weights, down_scale=dns)  # FP8 weights need their scales
    with pytest.raises(ValueError, match="scale"):
        fused_moe(x, gu8, dn8, ids, weights, gate_up_scale=gus[:, :-1], down_scale=dns)


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_and_out_of_range_ids(device: str) -> None:
    """Outside the contract (distinct ids in [0, E) a row), nothing is read or written out of bounds: a
    repeated expert is added twice, as the spec adds it, and an id out of range adds nothing."""
    x, gate_up, down, ids, weights = problem(4, 5, 3, 32, 16, torch.float32, device, seed=9)
    ids[1, 2] = ids[1, 0]
    torch.testing.assert_close(fused_moe(x, gate_up, down, ids, weights),
                               fused_moe_torch(x, gate_up, down, ids, weights), atol=2e-5, rtol=0)
    ids[2, 1], ids[3, 0] = 5, -1
    got = fused_moe(x, gate_up, down, ids, weights)
    keep = (ids >= 0) & (ids < 5)
    want = fused_moe_torch(x, gate_up, down, torch.where(keep, ids, 0), torch.where(keep, weights, 0))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
