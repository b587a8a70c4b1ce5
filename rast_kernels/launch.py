"""What every Triton launcher in rast_kernels asks of the runtime: are kernels interpreted on the CPU
(TRITON_INTERPRET=1, as in CI), and which compile options make float math round as torch's ops do."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def exact_fp_options() -> dict:
    """No FMA contraction, so a kernel's a * b + c rounds twice, like the torch ops it must equal
    (the interpreter never contracts and takes no such option)."""
    return {} if interpreting() else {"enable_fp_fusion": False}


def require_launchable(t: torch.Tensor, what: str) -> None:
    if not (t.is_cuda or interpreting()):
        raise RuntimeError(f"{what} needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors; got {t.device}")
