"""Every sampler kernel compiles to PTX for sm_90 with the interpreter off (see compile_util), so CI
without a GPU catches code the interpreter accepts and the compiler rejects."""
from __future__ import annotations

import sys

import pytest

import compile_util

INPUTS = ["l_ptr", "l_stride"] + [f"{n}{i}{s}" for i in range(4) for n in "rb" for s in ("", "s")] + ["w_ptr"]
ROW = {"temp_ptr": "*fp32", "topk_ptr": "*i32", "topp_ptr": "*fp32", "minp_ptr": "*fp32", "seed_ptr": "*i64",
       "offset_ptr": "*i64", "zmax_ptr": "*fp32", "key_ptr": "*i32", "greedy_ptr": "*i64", "cnt_ptr": "*i32",
       "smax_ptr": "*fp32", "sidx_ptr": "*i32", "smin_ptr": "*fp32", "scnt_ptr": "*i32", "cscore_ptr": "*fp32",
       "cidx_ptr": "*i32", "cbound_ptr": "*fp32", "path_ptr": "*i64", "cmass_ptr": "*fp32", "out_ptr": "*fp32", "V": "i32", "CHUNK": "i32", "S": "i32",
       "cid_ptr": "*i32", "cz_ptr": "*fp32", "ccnt_ptr": "*i32", "ncmax_ptr": "*fp32",
       "ncsum_ptr": "*fp32", "fast_ptr": "*i64", "tries_ptr": "*i32", "pf_ptr": "*fp32", "pk_ptr": "*i32", "pi_ptr": "*i64",
       # _stats' raw parameters: tensors as the engine passes them, scalars as Python values arrive
       "temp_v": "fp32", "topk_v": "i32", "topp_v": "fp32", "minp_v": "fp32", "seed_v": "i64", "offset_v": "i32"}


def _kernels() -> list[tuple]:
    """(kernel, constexprs, compile options) as sample() and probs() launch them at Qwen2.5's vocabulary
    on a 132-SM GPU for batches 1, 32 and 256 (each plan its own S and CAP), plus scalar parameters."""
    from rast_kernels import sampler_triton as st
    from rast_kernels import sampler_triton_plan as plan
    from rast_kernels.launch import next_pow2

    # scalar ints equal to 1 reach the kernel as constexprs (the launcher specialises them)
    ones = dict(topk_v=1, seed_v=1, offset_v=1)
    eight = {"num_warps": 8}
    stats = {"num_warps": plan.STATS_WARPS, "maxnreg": plan.stats_maxnreg(plan.STATS_WARPS)}
    out = [(st._stats, dict(BLOCK=1024, CAP=1024, WIDE=st.WIDE, ROWS=0b010000), stats),  # scalars, the seed a tensor
           (st._stats, dict(BLOCK=1024, CAP=1024, WIDE=st.WIDE, ROWS=0, **ones), stats),
           (st._draw, dict(SUM_MASS=False, BLOCK=1024, M=st.DRAWS), {}),
           (st._draw, dict(SUM_MASS=True, BLOCK=1024, M=1), {})]
    for rows in (1, 32, 256):
        block, _, splits, cap = st.launch_plan(rows, 152064, 132)
        sp = next_pow2(splits)
        out.append((st._stats, dict(BLOCK=block, CAP=cap, WIDE=st.WIDE, ROWS=0b111111), stats))  # tensors
        out += [(st._select, dict(BLOCK=256, NB=16, LOG2_NB=4, SP=sp, CAP=cap, DRAW=draw, VERIFY=draw,
                                        TRIES=st.PROOF_TRIES), eight)
                for draw in (True, False)]
        out += [(st._finish, dict(SP=sp, M=st.DRAWS, BLOCK=block, HIST_BLOCK=256, NB=16, LOG2_NB=4), eight),
                (st._write_probs, dict(BLOCK=block, SP=sp), {})]
    return out


def _signature(fn, dtype: str, consts: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in INPUTS:
            sig[name] = "*fp32" if name == "w_ptr" else ("i32" if name.endswith(("s", "stride")) else dtype)
        else:
            sig[name] = ROW[name]
    if fn.__name__ == "_finish":
        sig["out_ptr"] = "*i64"
    return sig


# what the launcher promises at Qwen2.5's vocabulary: every stride, V and CHUNK a multiple of 16
ALIGNED_INTS = {"l_stride", "V", "CHUNK", *(f"{n}{i}s" for i in range(4) for n in "rb")}


def compile_all(dtype: str, pairs: int) -> None:
    """Each kernel twice: as the launcher specialises it for aligned rows, and without that promise
    (rows at an odd offset). _stats must not spill in the aligned build, the one a GPU runs."""
    for fn, consts, options in _kernels():
        consts = dict(consts, PAIRS=pairs)
        sig = _signature(fn, dtype, consts)
        aligned = tuple(n for n in sig if n not in consts and (sig[n].startswith("*") or n in ALIGNED_INTS))
        compile_util.compile_ptx(fn, sig, consts, enable_fp_fusion=False, **options)
        compile_util.compile_ptx(fn, sig, consts, aligned=aligned, no_spills=fn.__name__ == "_stats",
                                 enable_fp_fusion=False, **options)


@pytest.mark.parametrize("dtype,pairs", [("*bf16", 1), ("*fp32", 0)])
def test_kernels_compile_for_sm90(dtype: str, pairs: int) -> None:
    compile_util.run_without_interpreter(__file__, dtype, str(pairs))


if __name__ == "__main__":
    compile_all(sys.argv[1], int(sys.argv[2]))
