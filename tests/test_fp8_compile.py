"""The FP8 linear kernel compiles to PTX and a cubin for sm_90 with the interpreter off, without register
spills and within a Hopper block's shared memory, for every tile plan it launches on a 132-SM GPU at the
projections of Qwen2.5-7B and 32B (decode and prefill token counts) and for each activation dtype. The
interpreter runs none of the compiled FP8 conversions, so this is what catches a compiler rejection
before a GPU does. Numerics on a GPU: test_fp8_linear's gpu cases."""
from __future__ import annotations

import sys

import pytest

import compile_util

DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
SHAPES = [(3584, 4608), (3584, 3584), (3584, 37888), (18944, 3584), (5120, 7168), (27648, 5120)]  # (K, N)


def compile_all(dtype: str) -> None:
    import torch

    from rast_kernels import fp8_linear as f

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    types = dict(x_ptr=f"*{dtype}", w_ptr="*fp8e4nv", s_ptr="*fp32", b_ptr=f"*{dtype}", o_ptr=f"*{dtype}", M="i32",
                 N="i32", K="i32", stride_xm="i32", stride_wn="i32", stride_om="i32")
    plans = {f.plan(m, n, torch_dtype, 132) for k, n in SHAPES for m in (1, 8, 32, 64, 128, 2048)}
    if dtype == "fp32":  # the launcher's fp32 plan outside the interpreter (launch.interpreting() is False here)
        assert plans == {(16, 32, 32, 4)}, plans
    for bm, bn, bk, warps in sorted(plans):
        for bias in (False, True):
            compile_util.compile_ptx(f._fp8_linear_kernel, types,
                                     dict(HAS_BIAS=bias, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST=False,
                                          PRECISION="ieee" if dtype == "fp32" else "tf32"),
                                     aligned=("x_ptr", "w_ptr", "s_ptr", "o_ptr", "K", "stride_xm", "stride_wn"),
                                     num_warps=warps, num_stages=3, no_spills=True)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_fp8_linear_compiles_for_sm90(dtype: str) -> None:
    compile_util.run_without_interpreter(__file__, dtype)


if __name__ == "__main__":
    compile_all(sys.argv[1])
