"""What one round of each loop of the sampler's ``_select`` (or ``_stats``) costs in machine code, on
any machine.

``_select`` (one program per row) runs up to 31 rounds of each bisection on its candidate tile at
every sampled step, so at B <= 32 its sequential rounds, not HBM, are likely what limits the fused
sampler. This script compiles it for sm_90 (no GPU needed: Triton's ptxas and cuobjdump) under the
launch plans an H100 gets at B = 1 and 32, and lists every loop of the SASS with its instructions,
barriers (BAR: each a block-wide wait), shuffles, warp reductions and local-memory accesses (spill
traffic: LDL/STL) per round, plus registers and spill stack. These are static counts, not timings: they rank variants of a loop before a GPU can time
them. ``--kernel stats`` does the same for ``_stats``, the one read of the inputs, whose loop runs once
per block of BLOCK tokens; ``--kernel finish`` for ``_finish``, whose first loop is the one read of a
flat top-p row that proves its draw (rast_kernels.sampler_triton_finish). Each kernel is compiled as
the launcher specialises it at V = 152064 (aligned tensors; strides, V and CHUNK multiples of 16, so a
thread's tokens load as one vector), with sampler_triton's launch options (``_stats``' register cap).
Result files up to sass-stats-1cf2256.json were compiled without that promise (scalar loads, a few more
instructions a token, other register counts). Writes bench/results/sass-<kernel>-<shortsha>.json.

``--kernel skinny`` compiles rast_kernels.skinny_linear (decode_linear="skinny") under the plans an H100
gets at Qwen2.5-7B's projections, at 1 and 4 rows.

    python bench/sass_loops.py [--kernel select|stats|finish|skinny] [--sms 132] [--num-warps 8]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # interpreted kernels cannot be compiled

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench.common import git_sha, now, table  # noqa: E402
from rast_kernels import sampler_triton, sampler_triton_plan, skinny_linear  # noqa: E402
from test_sampler_compile import ALIGNED_INTS, _signature  # noqa: E402

INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")


def _tool(name: str) -> str:
    found = glob.glob(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name))
    if not found:
        raise SystemExit(f"this Triton ships no {name}")
    return found[0]


def cubin_of(kernel: str, splits: int, cap: int, num_warps: int, pairs: int = 1) -> bytes:
    """_select (DRAW on), _stats (per-row parameter tensors) or _finish compiled for sm_90 as
    sampler_triton launches them on a GPU, with bf16 inputs."""
    sp = triton.next_power_of_2(splits)
    if kernel == "select":
        fn = sampler_triton._select
        consts = dict(BLOCK=256, NB=16, LOG2_NB=4, SP=sp, CAP=cap, DRAW=True, VERIFY=True,
                      TRIES=sampler_triton.PROOF_TRIES)
    elif kernel == "finish":
        fn = sampler_triton._finish
        consts = dict(SP=sp, M=sampler_triton.DRAWS, BLOCK=1024, HIST_BLOCK=256, NB=16, LOG2_NB=4)
    else:
        fn = sampler_triton._stats
        consts = dict(BLOCK=1024, CAP=cap, WIDE=sampler_triton.WIDE, ROWS=0b111111)
    consts["PAIRS"] = pairs
    names = list(fn.arg_names)
    signature = _signature(fn, "*bf16", consts)
    # the launcher's specialisation at V = 152064: tensors 16-byte aligned, and every row stride, V and
    # CHUNK divisible by 16 (so a thread's bf16 tokens load as one vector)
    aligned = [n for n in names if n not in consts and (signature[n].startswith("*") or n in ALIGNED_INTS)]
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    options = dict(enable_fp_fusion=False, num_warps=num_warps)
    if kernel == "stats":  # as sampler_triton launches it
        options["maxnreg"] = sampler_triton_plan.stats_maxnreg(num_warps)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]


def skinny_cubin(rows: int, block_n: int, block_k: int, num_warps: int) -> bytes:
    """rast_kernels.skinny_linear's kernel for sm_90 as its launcher specialises it for bf16 projections
    (pointers, K and the row strides divisible by 16)."""
    fn = skinny_linear._skinny_linear_kernel
    consts = dict(M=rows, HAS_BIAS=False, BLOCK_N=block_n, BLOCK_K=block_k)
    names = list(fn.arg_names)
    signature = {n: "constexpr" if n in consts else ("*bf16" if n.endswith("_ptr") else "i32") for n in names}
    aligned = ("x_ptr", "w_ptr", "y_ptr", "K", "stride_xm", "stride_wn", "stride_ym")
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps)).asm["cubin"]


def loops(sass: str) -> list[dict]:
    """Every backward branch's body: [start, end] and its instruction mix (inner loops also count in
    the loops around them)."""
    code = [(int(m.group(1), 16), m.group(2)) for m in map(INSTRUCTION.match, sass.splitlines()) if m]
    index = {addr: i for i, (addr, _) in enumerate(code)}
    found = []
    for i, (addr, text) in enumerate(code):
        target = re.search(r"0x([0-9a-f]+)", text.split("BRA", 1)[1]) if "BRA" in text else None
        if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in index:
            body = [t for _, t in code[index[int(target.group(1), 16)]:i + 1]]
            found.append(dict(start=hex(int(target.group(1), 16)), end=hex(addr), instructions=len(body),
                              barriers=sum("BAR" in t for t in body), shuffles=sum("SHFL" in t for t in body),
                              warp_reductions=sum("REDUX" in t for t in body),
                              local_memory=sum(("LDL" in t) or ("STL" in t) for t in body)))
    return found


def machine_code(cubin_bytes: bytes, workdir: Path) -> dict:
    """Registers, spill stack, instructions and loops of a cubin."""
    cubin = workdir / "kernel.cubin"
    cubin.write_bytes(cubin_bytes)
    usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    regs, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    return dict(registers=regs, spill_stack_bytes=stack,
                instructions=len([line for line in sass.splitlines() if INSTRUCTION.match(line)]),
                loops=loops(sass))


def profile(kernel: str, splits: int, cap: int, num_warps: int, workdir: Path) -> dict:
    return dict(splits=splits, cap=cap, num_warps=num_warps,
                **machine_code(cubin_of(kernel, splits, cap, num_warps), workdir))


def skinny_plans(sms: int) -> list[dict]:
    """skinny_linear at 1 and 4 rows under the plans an sm_90 GPU with ``sms`` SMs gets at Qwen2.5-7B's
    projections (K, N): qkv, o, gate_up, down, lm_head."""
    plans = []
    for proj, (k, n) in {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888), "down": (18944, 3584),
                         "lm_head": (3584, 152064)}.items():
        block_n, block_k, warps = skinny_linear.plan(n, k, sms)
        for rows in (1, 4):
            with tempfile.TemporaryDirectory() as workdir:
                code = machine_code(skinny_cubin(rows, block_n, block_k, warps), Path(workdir))
            plans.append(dict(proj=proj, rows=rows, block_n=block_n, block_k=block_k, num_warps=warps,
                              weights_a_thread_a_loop=2 * block_n * block_k // (32 * warps), **code))
    return plans


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", choices=("select", "stats", "finish", "skinny"), default="select")
    ap.add_argument("--sms", type=int, default=132, help="SMs of the GPU whose launch plans are compiled")
    ap.add_argument("--num-warps", type=int, default=8, help="sampler_triton's default: 8 for each kernel")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results folder")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    num_warps = args.num_warps
    plans = []
    if args.kernel == "skinny":
        plans = skinny_plans(args.sms)
        print(table(plans, ["proj", "rows", "block_n", "block_k", "registers", "spill_stack_bytes",
                            "weights_a_thread_a_loop"]))
        print(table([dict(proj=p["proj"], rows=p["rows"], **loop) for p in plans for loop in p["loops"]],
                    ["proj", "rows", "instructions", "barriers", "shuffles", "local_memory"]))
    for batch in () if args.kernel == "skinny" else (1, 32) if args.kernel != "stats" else (1, 32, 256):
        _, _, splits, cap = sampler_triton.launch_plan(batch, 152064, args.sms, block=1024)
        with tempfile.TemporaryDirectory() as workdir:
            plan = dict(batch=batch, **profile(args.kernel, splits, cap, num_warps, Path(workdir)))
        plans.append(plan)
        print(f"B={batch}: {splits} chunks x {cap} candidates, {plan['registers']} registers, "
              f"{plan['spill_stack_bytes']} B spill stack, {plan['instructions']} instructions")
        print(table(plan["loops"], ["start", "end", "instructions", "barriers", "shuffles", "warp_reductions",
                                    "local_memory"]))
    path = args.out / f"sass-{args.kernel}-{git_sha()}.json"
    path.write_text(json.dumps(dict(kernel=f"_{args.kernel}", target="sm_90", triton=triton.__version__,
                                    commit=git_sha(), date=now(), plans=plans), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
