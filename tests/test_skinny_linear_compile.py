"""The skinny linear kernel compiles to PTX and a cubin for sm_90 with the interpreter off, without register
spills and within a Hopper block's shared memory, for every plan it launches on a 132-SM GPU at the
projections of Qwen2.5-7B and 32B, for 1 to 4 rows and each dtype. Numerics on a GPU: test_skinny_linear's
gpu cases."""
from __future__ import annotations

import sys

import pytest

import compile_util

SHAPES = [(3584, 4608), (3584, 3584), (3584, 37888), (18944, 3584), (3584, 152064), (5120, 7168), (27648, 5120)]


def compile_all(dtype: str) -> None:
    from rast_kernels import skinny_linear as s

    types = dict(x_ptr=f"*{dtype}", w_ptr=f"*{dtype}", b_ptr=f"*{dtype}", y_ptr=f"*{dtype}", N="i32", K="i32",
                 stride_xm="i32", stride_wn="i32", stride_ym="i32")
    plans = sorted({s.plan(n, k, 132, 4 if dtype == "fp32" else 2) for k, n in SHAPES})
    assert {bn for bn, _, _ in plans} >= {4, 16}, plans  # narrow strips for narrow projections, wide for wide
    for bn, bk, warps in plans:
        for m in range(1, s.MAX_ROWS + 1):
            compile_util.compile_ptx(s._skinny_linear_kernel, types,
                                     dict(M=m, HAS_BIAS=m % 2 == 1, BLOCK_N=bn, BLOCK_K=bk),
                                     aligned=("x_ptr", "w_ptr", "y_ptr", "K", "stride_xm", "stride_wn", "stride_ym"),
                                     num_warps=warps, num_stages=3, no_spills=True)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_skinny_linear_compiles_for_sm90(dtype: str) -> None:
    compile_util.run_without_interpreter(__file__, dtype)


if __name__ == "__main__":
    compile_all(sys.argv[1])
