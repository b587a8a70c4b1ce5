"""What every Triton launcher in rast_kernels asks of the runtime: are kernels interpreted on the CPU
(TRITON_INTERPRET=1, as in CI), and which compile options make float math round as torch's ops do."""
from __future__ import annotations

import functools
import os

import torch


# how triton.jit decorated the kernels, which it decides once, at import; read once here too (an
# environment lookup per call costs the eager sampler ~2 µs each, eight times a call)
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    return _INTERPRETING


def exact_fp_options() -> dict:
    """No FMA contraction, so a kernel's a * b + c rounds twice, like the torch ops it must equal
    (the interpreter never contracts and takes no such option)."""
    return {} if interpreting() else {"enable_fp_fusion": False}


def require_launchable(t: torch.Tensor, what: str) -> None:
    if not (t.is_cuda or interpreting()):
        raise RuntimeError(f"{what} needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors; got {t.device}")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) in plain Python: triton.cdiv is a JIT-aware function costing ~2.7 µs a call on the host,
    and a sampler call does launch arithmetic a dozen times."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), without triton.next_power_of_2's host cost."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """The device's streaming multiprocessors (1 off CUDA), which the launch plans size their grids by;
    cached, as a device-properties query costs host time every launch."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
