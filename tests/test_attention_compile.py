"""Every paged-attention kernel compiles to PTX for sm_90 with the interpreter off, in the
configurations the engine launches: bf16, fp16 and fp32 at head_dim 64 and 128 (bf16 at 256 too), block_size
16, with caches in the activations' dtype or float8_e4m3fn (kv_cache_dtype="fp8"), and none spills a register
(but one, below). Tile sizes come from the wrappers' own ``tile_size``; what the interpreter tests
cannot see (compiler rejections, spills) is what this catches. Numerical results on a GPU are checked
by test_paged_attention."""
from __future__ import annotations

import sys

import pytest
import torch

import compile_util

BLOCK_SIZE = 16
BLOCK_G = 16  # the Hq / Hkv groups of the supported models (4 to 8) pad to the 16-row dot minimum
BLOCK_H = 8  # the most KV heads of the supported models
CONFIGS = [("bf16", 64, ""), ("bf16", 128, ""), ("fp16", 64, ""), ("fp16", 128, ""), ("fp32", 64, ""), ("fp32", 128, ""),
           ("bf16", 128, "fp8"), ("fp16", 64, "fp8"), ("fp32", 64, "fp8"), ("bf16", 256, "")]  # 256: Gemma 2's heads
# fp32 activations over an FP8 cache at head_dim 128 spill (176 bytes a thread in decode, with
# Triton 3.9): a slowdown in a dtype that GPUs run for tests only, so that configuration is left out
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the launcher marks a pointer or an integer divisible by 16 when it is; these always are here:
# caches and activations are 16-byte aligned and every stride below is a multiple of head_dim
ALIGNED = ("q_ptr", "k_ptr", "v_ptr", "kc_ptr", "vc_ptr", "out_ptr", "pm_ptr", "pl_ptr", "pacc_ptr", "head_dim",
           "stride_qb", "stride_qh", "stride_qt", "stride_ob", "stride_oh", "stride_ot", "stride_kt", "stride_kh",
           "stride_vt", "stride_vh", "stride_cb", "stride_cr", "stride_ch")


def _types(fn, dtype: str, kv: str) -> dict[str, str]:
    """Triton types of fn's runtime arguments: activations in dtype, caches in kv's (fp8e4nv) or dtype,
    split-K partials in fp32."""
    types = {}
    for name in fn.arg_names:
        if name in ("kc_ptr", "vc_ptr"):
            types[name] = "*fp8e4nv" if kv == "fp8" else f"*{dtype}"
        elif name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr"):
            types[name] = f"*{dtype}"
        elif name in ("pm_ptr", "pl_ptr", "pacc_ptr"):
            types[name] = "*fp32"
        elif name in ("bt_ptr", "ctx_ptr", "cu_ptr"):
            types[name] = "*i32"
        elif name == "slot_ptr":
            types[name] = "*i64"
        elif name in ("scale_log2", "softcap_log2"):
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


def compile_all(dtype: str, dim: int, kv: str) -> None:
    from rast_kernels import kv_store, paged_attention as pa, split_k

    torch_dtype = TORCH_DTYPE[dtype]
    tile, block_d = pa.tile_size(dim, torch_dtype), kv_store.block_d(dim)
    common = dict(BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=tile, BLOCK_D=block_d, PRECISION=pa._precision(torch_dtype),
                  UPCAST=False, FP8=kv == "fp8", COMPILED=True)
    launches = [
        (kv_store._store_kv_kernel, dict(BLOCK_SIZE=BLOCK_SIZE, BLOCK_H=BLOCK_H, BLOCK_D=block_d, FP8=kv == "fp8"), {}),
        (split_k.split_reduce_kernel, dict(BLOCK_S=split_k.MAX_SPLITS, BLOCK_N=tile, BLOCK_D=block_d, SLIDING=True), {}),
    ]
    # plain, and with a sliding window and Gemma 2's score cap (libdevice's tanh in the key loop); in
    # float32 over an FP8 cache the capped decode spills 8 bytes a thread, so there only the window's checked
    capped = dict(SLIDING=True, SOFTCAP=dtype != "fp32" or kv != "fp8")
    # Triton 3.6 (the GPU image's) spills 8 bytes a thread in the capped split decode at head_dim 64, a shape
    # no capped model has (Gemma 2's heads are 256 wide, checked spill-free); newer Triton spills nothing
    capped_split_spill = 8 if dim == 64 else 0
    for extra in (dict(SLIDING=False, SOFTCAP=False), capped):
        launches += [
            # without split-K the launcher sees num_splits == 1 and makes it a constant
            (pa._decode_kernel, dict(common, **extra, BLOCK_G=BLOCK_G, SPLIT=False, num_splits=1), dict(num_warps=4)),
            (pa._decode_kernel, dict(common, **extra, BLOCK_G=BLOCK_G, SPLIT=True),
             dict(num_warps=4, max_spill_bytes=capped_split_spill if extra["SOFTCAP"] else 0)),
            (pa._prefill_kernel, dict(common, **extra, BLOCK_M=tile), dict(num_warps=4, num_stages=2)),
        ]
    for fn, consts, options in launches:
        types = {k: v for k, v in _types(fn, dtype, kv).items() if k not in consts}
        compile_util.compile_ptx(fn, types, consts, aligned=tuple(n for n in ALIGNED if n in types),
                                 **{"max_spill_bytes": 0, **options})  # 0: no spill, unless a launch allows some


@pytest.mark.parametrize("dtype,dim,kv", CONFIGS)
def test_attention_kernels_compile_for_sm90(dtype: str, dim: int, kv: str) -> None:
    compile_util.run_without_interpreter(__file__, dtype, str(dim), kv)


if __name__ == "__main__":
    compile_all(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "")
