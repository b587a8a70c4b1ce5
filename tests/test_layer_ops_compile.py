"""Every layer-ops kernel compiles to PTX and a cubin for sm_90 with the interpreter off, in the
configurations the engine launches: the compiled branches (COMPILED=True: libdevice expf, IEEE division,
the mean as sum * 1/N), no FMA contraction, the rotary with and without its KV-cache store and with and
without Qwen3's per-head norm, at the
widths of the supported models. The interpreter runs none of these branches' compiled code, so this is
what catches a compiler rejection before a GPU does. Numerics on a GPU: test_layer_kernels' gpu cases."""
from __future__ import annotations

import sys

import pytest

import compile_util

DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
# what rast_kernels.launch.exact_fp_options() gives when compiled, and no register spills (compile_util)
NO_FMA = dict(enable_fp_fusion=False, no_spills=True)
HIDDEN, INTER = 5120, 27648  # Qwen2.5-14B/32B widths: the largest BLOCK the norm takes, the widest MLP


def compile_all(dtype: str) -> None:
    from rast_kernels import layer_ops as lo
    from rast_kernels.launch import next_pow2

    ptr, i32, fp32 = f"*{dtype}", "i32", "fp32"
    norm_types = dict(x_ptr=ptr, x_stride=i32, r_ptr=ptr, r_stride=i32, w_ptr=ptr, w_stride=i32, group_rows=i32,
                      y_ptr=ptr, s_ptr=ptr, N=i32,
                      inv_n=fp32, eps=fp32)
    block = next_pow2(HIDDEN)
    for residual in (False, True):
        compile_util.compile_ptx(lo._rms_norm_kernel, norm_types,
                                 dict(HAS_RESIDUAL=residual, BLOCK=block, COMPILED=True),
                                 num_warps=min(16, block // 512), **NO_FMA)
    rotary_types = {n: ptr for n in ("q_ptr", "k_ptr", "cs_ptr", "q_out", "k_out", "v_ptr", "kc_ptr", "vc_ptr")}
    rotary_types.update(pos_ptr="*i64", slot_ptr="*i64")
    rotary_types.update({n: i32 for n in ("q_stride_t", "q_stride_h", "k_stride_t", "k_stride_h", "cs_stride",
                                          "HQ", "HK", "Q_BLOCKS", "v_stride_t", "v_stride_h", "c_stride_b",
                                          "c_stride_r", "c_stride_h", "w_stride", "group_tokens")})
    rotary_types.update(qw_ptr=ptr, kw_ptr=ptr, eps=fp32, inv_d=fp32)
    for store, fp8 in ((False, False), (True, False), (True, True)):  # fp8: a float8_e4m3fn cache
        types = dict(rotary_types, kc_ptr="*fp8e4nv", vc_ptr="*fp8e4nv") if fp8 else rotary_types
        for qk_norm in (False, True):
            compile_util.compile_ptx(lo._rotary_kernel, types,
                                     dict(HALF=64, BLOCK_H=8, BLOCK_D=64, STORE_KV=store, BLOCK_SIZE=16,
                                          QK_NORM=qk_norm, COMPILED=True, FP8=fp8), num_warps=4, **NO_FMA)
    for gelu in (False, True):  # Gemma's GELU-tanh: libdevice's tanh
        compile_util.compile_ptx(lo._act_mul_kernel, dict(x_ptr=ptr, x_stride=i32, y_ptr=ptr, N=i32),
                                 dict(BLOCK=1024, COMPILED=True, GELU=gelu), num_warps=4, **NO_FMA)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_layer_kernels_compile_for_sm90(dtype: str) -> None:
    compile_util.run_without_interpreter(__file__, dtype)


if __name__ == "__main__":
    compile_all(sys.argv[1])
