"""Compile Triton kernels to PTX for sm_90 on a machine without a GPU.

The interpreter accepts code the compiler rejects (global non-constexpr names, loop-carried type
changes, ops a dtype lacks), so kernel tests compile each kernel as well. conftest turns the interpreter
on for the test process and interpreted kernels cannot be compiled, so the compile runs in a child
process with TRITON_INTERPRET unset (``run_without_interpreter``)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import triton

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - depends on the installed Triton
    pytest.skip("this Triton has no ASTSource / GPUTarget compile entry", allow_module_level=True)


SM90_SHARED_BYTES = 232448  # 227 KiB: the most shared memory one H100 / H200 block may take


def spill_bytes(cubin: bytes) -> int | None:
    """The per-thread stack (register spills) of a cubin, by Triton's bundled cuobjdump (None: absent)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


def compile_ptx(fn, types: dict[str, str], consts: dict, *, aligned: tuple[str, ...] = (), no_spills: bool = False,
                max_spill_bytes: int | None = None, **options) -> str:
    """PTX of ``fn`` for sm_90, compiled through ptxas to a cubin. types maps every runtime argument to
    a Triton type ("*bf16", "i32"); consts gives every constexpr; ``aligned`` arguments are promised
    divisible by 16, as the launcher promises for 16-byte aligned pointers and integers that are
    multiples of 16. A kernel that needs more shared memory than a Hopper block has would compile and
    then fail at launch ("out of resource"), so that is checked here; with ``no_spills``, that ptxas
    spilled no register (a slowdown, not an error, that only the machine code shows), with
    ``max_spill_bytes`` at most that many bytes a thread."""
    missing = [n for n in fn.arg_names if n not in types and n not in consts]
    if missing:
        raise ValueError(f"{fn.__name__}: no type or value for {missing}")
    names = list(fn.arg_names)
    signature = {n: "constexpr" if n in consts else types[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    assert ".entry" in ptx and compiled.asm.get("cubin"), fn.__name__
    shared = compiled.metadata.shared
    assert shared <= SM90_SHARED_BYTES, f"{fn.__name__} needs {shared} bytes of shared memory per block"
    if no_spills or max_spill_bytes is not None:
        spilled, limit = spill_bytes(compiled.asm["cubin"]), 0 if no_spills else max_spill_bytes
        assert not spilled or spilled <= limit, f"{fn.__name__} {consts} spills {spilled} bytes a thread"
    return ptx


def run_without_interpreter(script: str, *args: str, timeout: float = 300) -> None:
    """Run ``python script *args`` with the interpreter off; fail with the child's stderr if it fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
