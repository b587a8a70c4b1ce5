"""rast_kernels.lora_slots' shrink and expand kernels compile to PTX and a cubin for sm_90 with the interpreter
off, within a Hopper block's shared memory, for every tile plan they launch on a 132-SM GPU: the projections
of Qwen2.5-0.5B, 1.5B and 7B as small models, ranks 8-256, decode and prefill token counts, each dtype. The
interpreter accepts what the compiler may reject (a dynamic branch on a reduction inside a loop, tl.dot's
shapes), so this is what catches it before a GPU does. The shrink spills no register; ptxas spills a few
bytes of the expand kernel's under some tile shapes (8-56 bytes a thread seen, varying with the shape and
dtype, not with its size: its Bᵀ tile's 64-bit addresses fill the registers), and more than 64 fails, as a
rank-256 tile in one piece did (4.6 KB). Numerics on a GPU: test_lora_slots_kernel's gpu cases."""
from __future__ import annotations

import sys

import pytest

import compile_util

DTYPES = ("bf16", "fp16", "fp32")
# (hidden, q size, kv size, intermediate) of Qwen2.5-0.5B, 1.5B and 7B (bench/configs)
MODELS = [(896, 896, 128, 4864), (1536, 1536, 256, 8960), (3584, 3584, 512, 18944)]


def compile_all(dtype: str) -> None:
    import torch

    from rast_kernels import lora_slots as k
    from rast_kernels.launch import exact_fp_options

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    precision = "ieee" if dtype == "fp32" else "tf32"
    shrink, expand = set(), set()
    for h, q, kv, inter in MODELS:
        for fan_in, parts in ((h, 3), (q, 1), (h, 2), (inter, 1)):  # q/k/v, o, gate/up, down
            for rank in (8, 16, 64, 128, 256):
                for tokens in (1, 8, 32, 64, 256, 2048):
                    bt, bj, bk, _, bn, br, warps = k.plan(tokens, parts * rank, rank, fan_in, torch_dtype, 132)
                    shrink.add((bt, bj, bk, warps))
                    expand.add((bt, bn, br, parts))
    for slots in ("*i32", "*i64"):
        for bt, bj, bk, warps in sorted(shrink):
            types = dict(x_ptr=f"*{dtype}", a_ptr=f"*{dtype}", slots_ptr=slots, h_ptr="*fp32", T="i32", K="i32",
                         W="i32", S="i32", K_SPLIT="i32", stride_x="i32", stride_a="i32")
            compile_util.compile_ptx(k._shrink_kernel, types, dict(BLOCK_T=bt, BLOCK_J=bj, BLOCK_K=bk, UPCAST=False,
                                                                   PRECISION=precision),
                                     aligned=("x_ptr", "a_ptr", "h_ptr", "K", "stride_x", "stride_a"), no_spills=True,
                                     num_warps=warps, **exact_fp_options())
        for bt, bn, br, parts in sorted(expand):
            types = dict(h_ptr="*fp32", b_ptr=f"*{dtype}", slots_ptr=slots, y_ptr=f"*{dtype}", T="i32", N="i32",
                         W="i32", R="i32", S="i32", SPLIT="i32", START1="i32", START2="i32", stride_b="i32",
                         stride_y="i32")
            compile_util.compile_ptx(k._expand_kernel, types, dict(PARTS=parts, BLOCK_T=bt, BLOCK_N=bn, BLOCK_R=br,
                                                                   UPCAST=False, PRECISION=precision),
                                     aligned=("h_ptr", "b_ptr", "y_ptr", "stride_b", "stride_y"), max_spill_bytes=64,
                                     num_warps=4, **exact_fp_options())


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_slot_kernels_compile_for_sm90(dtype: str) -> None:
    compile_util.run_without_interpreter(__file__, dtype)


if __name__ == "__main__":
    compile_all(sys.argv[1])
