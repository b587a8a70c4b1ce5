"""The Triton interpreter accepts code the compiler rejects (global non-constexpr names, loop-carried
type changes). Without a GPU, compile every sampler kernel to PTX for sm_90 so CI catches those. The
compile runs in a subprocess: conftest turns the interpreter on for this process, and interpreted
kernels cannot be compiled."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import triton

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - depends on the installed Triton
    pytest.skip("this Triton has no ASTSource / GPUTarget compile entry", allow_module_level=True)

INPUTS = ["l_ptr", "l_stride"] + [f"{n}{i}{s}" for i in range(4) for n in "rb" for s in ("", "s")] + ["w_ptr"]
ROW = {"temp_ptr": "*fp32", "topk_ptr": "*i32", "topp_ptr": "*fp32", "minp_ptr": "*fp32", "seed_ptr": "*i64",
       "offset_ptr": "*i64", "zmax_ptr": "*fp32", "key_ptr": "*i32", "greedy_ptr": "*i64", "cnt_ptr": "*i32",
       "smax_ptr": "*fp32", "sidx_ptr": "*i32", "smin_ptr": "*fp32", "scnt_ptr": "*i32", "cscore_ptr": "*fp32",
       "cidx_ptr": "*i32", "cmass_ptr": "*fp32", "out_ptr": "*fp32", "V": "i32", "CHUNK": "i32", "S": "i32",
       "margin_ptr": "*fp32", "cid_ptr": "*i32", "cz_ptr": "*fp32", "ccnt_ptr": "*i32", "ncmax_ptr": "*fp32",
       "ncsum_ptr": "*fp32", "fast_ptr": "*i64"}
def _kernels() -> list:
    from rast_kernels import sampler_triton as st

    return [
        (st._stats, dict(BLOCK=1024, CAP=1024)),
        (st._select, dict(BLOCK=256, NB=16, LOG2_NB=4, SP=4, CAP=1024, DRAW=True)),
        (st._select, dict(BLOCK=256, NB=16, LOG2_NB=4, SP=256, CAP=16, DRAW=False)),
        (st._draw, dict(SUM_MASS=False, BLOCK=1024)),
        (st._draw, dict(SUM_MASS=True, BLOCK=1024)),
        (st._finish, dict(SP=64)),
        (st._write_probs, dict(BLOCK=1024, SP=64)),
    ]


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


def compile_all(dtype: str, pairs: int) -> None:
    for fn, consts in _kernels():
        consts = dict(consts, **({} if fn.__name__ == "_finish" else {"PAIRS": pairs}))
        src = ASTSource(fn=fn, signature=_signature(fn, dtype, consts),
                        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
        assert ".entry" in kernel.asm["ptx"], fn.__name__


@pytest.mark.parametrize("dtype,pairs", [("*bf16", 1), ("*fp32", 0)])
def test_kernels_compile_for_sm90(dtype: str, pairs: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, dtype, str(pairs)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


if __name__ == "__main__":
    compile_all(sys.argv[1], int(sys.argv[2]))
