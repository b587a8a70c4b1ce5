"""The fused MoE kernels (routing, alignment, the expert GEMMs, the sum) compile to PTX and a cubin for sm_90 with the interpreter off, without register
spills and within a Hopper block's shared memory, for every tile plan the launcher picks on a 132-SM GPU
at the expert shapes of Qwen3-30B-A3B, Qwen1.5-MoE-A2.7B, OLMoE-1B-7B and Mixtral-8x7B (decode and
prefill token counts), in each activation dtype, with the experts in that dtype or in FP8. The interpreter runs none of the compiled code paths
(libdevice SiLU, native bf16 dots), so this is what catches a compiler rejection before a GPU does.
Numerics on a GPU: test_moe_kernel's cuda cases."""
from __future__ import annotations

import sys

import pytest

import compile_util

# (experts, k, hidden, expert intermediate)
SHAPES = [(128, 8, 2048, 768), (60, 4, 2048, 1408), (64, 8, 2048, 1024), (8, 2, 4096, 14336)]


def compile_all(dtype: str) -> None:
    import torch

    from rast_kernels import moe
    from rast_kernels import moe_routing as routing

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    common = dict(pairs_ptr="*i32", tile_expert_ptr="*i32", P="i32", E="i32", I="i32", H="i32")
    gate_up_types = dict(x_ptr=f"*{dtype}", w_ptr=f"*{dtype}", s_ptr="*fp32", h_ptr=f"*{dtype}", stride_x="i32",
                         stride_we="i32", **common)
    down_types = dict(h_ptr=f"*{dtype}", w_ptr=f"*{dtype}", s_ptr="*fp32", weights_ptr=f"*{dtype}",
                      y_ptr=f"*{dtype}", stride_we="i32", **common)
    precision = "ieee" if dtype == "fp32" else "tf32"
    seen = set()
    for (e, k, h, i), fp8 in ((shape, fp8) for shape in SHAPES for fp8 in (False, True)):
        w_type = "*fp8e4nv" if fp8 else f"*{dtype}"  # quantization="fp8": e4m3 experts, float32 scales
        for tokens in (1, 8, 64, 2048):
            p = tokens * k
            bm, bn, bk, warps = moe.plan(p, e, i, torch_dtype, 132)
            if ("gate_up", fp8, bm, bn, bk, warps) not in seen:
                seen.add(("gate_up", fp8, bm, bn, bk, warps))
                compile_util.compile_ptx(moe._gate_up_kernel, {**gate_up_types, "w_ptr": w_type},
                                         dict(TOPK=k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, FP8_WEIGHTS=fp8,
                                              COMPILED=True, UPCAST=False, PRECISION=precision),
                                         aligned=("x_ptr", "w_ptr", "h_ptr", "H", "stride_x", "stride_we"),
                                         num_warps=warps, num_stages=3, no_spills=True, enable_fp_fusion=False)
            _, bn, bk, warps = moe.plan(p, e, h, torch_dtype, 132)
            if ("down", fp8, bm, bn, bk, warps) not in seen:
                seen.add(("down", fp8, bm, bn, bk, warps))
                compile_util.compile_ptx(moe._down_kernel, {**down_types, "w_ptr": w_type},
                                         dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, FP8_WEIGHTS=fp8, UPCAST=False,
                                              PRECISION=precision),
                                         aligned=("h_ptr", "w_ptr", "y_ptr", "H", "I", "stride_we"),
                                         num_warps=warps, num_stages=3, no_spills=True, enable_fp_fusion=False)
    for e, k, _, _ in SHAPES:
        block_e = 1 << (e - 1).bit_length()
        compile_util.compile_ptx(moe._sum_kernel, dict(y_ptr=f"*{dtype}", ids_ptr="*i32", out_ptr=f"*{dtype}",
                                                       E="i32", H="i32"),
                                 dict(TOPK=k, BLOCK_K=1 << (k - 1).bit_length(), BLOCK=1024),
                                 aligned=("y_ptr", "out_ptr", "H"), num_warps=4, no_spills=True,
                                 enable_fp_fusion=False)
        compile_util.compile_ptx(routing._route_kernel, dict(logits_ptr=f"*{dtype}", stride_l="i32", ids_ptr="*i32",
                                                             weights_ptr=f"*{dtype}", E="i32"),
                                 dict(TOPK=k, BLOCK_E=block_e, RENORMALIZE=True, COMPILED=True), num_warps=4,
                                 no_spills=True, enable_fp_fusion=False)
        compile_util.compile_ptx(routing._align_kernel, dict(ids_ptr="*i32", scratch_ptr="*i32", pairs_ptr="*i32",
                                                             tile_expert_ptr="*i32", P="i32", E="i32", SLOTS="i32"),
                                 dict(BLOCK_M=16, BLOCK_E=block_e, SEARCH_STEPS=block_e.bit_length() + 1, CHUNK=128),
                                 num_warps=4, no_spills=True)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_moe_kernels_compile_for_sm90(dtype: str) -> None:
    compile_util.run_without_interpreter(__file__, dtype)


if __name__ == "__main__":
    compile_all(sys.argv[1])
