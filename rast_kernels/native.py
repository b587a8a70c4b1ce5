"""Native CPU backend: the C++17 library built from rast_kernels/csrc by CMakeLists.txt, bound with ctypes.

The library takes raw pointers, row strides and dtype codes (no torch headers), so building it never needs
torch. It sits next to this file (``setup.py`` puts it there on install, for editable and regular installs
alike); ``RAST_NATIVE_LIB`` may name another build. If it is absent or fails to load, ``is_available()``
is False, ``unavailable_reason()`` says why, and the dispatcher serves CPU tensors with the torch backend.

The semantics are rast_kernels.reference's exactly (same d, w, thresholds and counter-based Gumbel noise);
only the algorithm differs: one pass for z and d, a histogram of d plus a selection inside one bin for the
top-k and top-p thresholds (no sort), and Gumbel-max over the admissible tokens. Rows run in parallel with
OpenMP on ``torch.get_num_threads()`` threads.
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import torch

from rast_kernels.batch import SamplingBatch

ABI_VERSION = 1
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class _Batch(ctypes.Structure):
    """Mirror of rast_batch in csrc/rast_native.h (field order and types must match)."""

    _fields_ = [
        ("batch", ctypes.c_int64),
        ("vocab", ctypes.c_int64),
        ("pairs", ctypes.c_int32),
        ("rows", ctypes.POINTER(ctypes.c_void_p)),
        ("row_strides", ctypes.POINTER(ctypes.c_int64)),
        ("dtypes", ctypes.POINTER(ctypes.c_int32)),
        ("weights", ctypes.c_void_p),
        ("temperature", ctypes.c_void_p),
        ("top_k", ctypes.c_void_p),
        ("top_p", ctypes.c_void_p),
        ("min_p", ctypes.c_void_p),
        ("seed", ctypes.c_void_p),
        ("offset", ctypes.c_void_p),
    ]


def _library_path() -> Path:
    override = os.environ.get("RAST_NATIVE_LIB")
    if override:
        return Path(override)
    name = {"win32": "rast_native.dll", "darwin": "librast_native.dylib"}.get(sys.platform, "librast_native.so")
    return Path(__file__).resolve().parent / name


def _load() -> tuple[ctypes.CDLL | None, str]:
    path = _library_path()
    if not path.is_file():
        return None, (f"{path} does not exist: the install could not build it (needs cmake and a C++17 "
                      f"compiler); from the source checkout, build it into this package with `cmake -S . -B "
                      f"build/native -DRAST_NATIVE_OUTPUT_DIR={path.parent} && cmake --build build/native`, "
                      f"or point RAST_NATIVE_LIB at a built library")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        return None, f"{path} failed to load: {err}"
    lib.rast_abi_version.restype = ctypes.c_int
    if lib.rast_abi_version() != ABI_VERSION:
        return None, f"{path} has ABI {lib.rast_abi_version()}, this package expects {ABI_VERSION}: rebuild it"
    lib.rast_sample.argtypes = [ctypes.POINTER(_Batch), ctypes.c_void_p, ctypes.c_int32]
    lib.rast_sample.restype = ctypes.c_int
    lib.rast_probs.argtypes = [ctypes.POINTER(_Batch), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32]
    lib.rast_probs.restype = ctypes.c_int
    lib.rast_error_string.argtypes = [ctypes.c_int]
    lib.rast_error_string.restype = ctypes.c_char_p
    return lib, ""


_LIB, _REASON = _load()


def is_available() -> bool:
    return _LIB is not None


def unavailable_reason() -> str:
    return _REASON


def library_path() -> Path:
    return _library_path()


def _prepare(batch: SamplingBatch, with_seed: bool) -> tuple[_Batch, list[torch.Tensor], list[object]]:
    """The rast_batch struct plus every object it points into (kept alive by the caller)."""
    if _LIB is None:
        raise RuntimeError(f"the native backend is not available: {_REASON}")
    matrices = [batch.logits] + [t for pair in zip(batch.rl, batch.base) for t in pair]
    for t in matrices:
        if t.device.type != "cpu":
            raise ValueError(f"the native backend runs on CPU tensors only, got a tensor on {t.device}")
    params = [
        batch.weights.to(torch.float32).contiguous(),
        batch.temperature.to(torch.float32).contiguous(),
        batch.top_k.to(torch.int32).contiguous(),
        batch.top_p.to(torch.float32).contiguous(),
        batch.min_p.to(torch.float32).contiguous(),
        batch.seed.to(torch.int64).contiguous() if with_seed else None,
        batch.offset.to(torch.int64).contiguous() if with_seed else None,
    ]
    rows = (ctypes.c_void_p * len(matrices))(*[t.data_ptr() for t in matrices])
    strides = (ctypes.c_int64 * len(matrices))(*[t.stride(0) for t in matrices])
    dtypes = (ctypes.c_int32 * len(matrices))(*[DTYPE_CODES[t.dtype] for t in matrices])
    ptr = [None if p is None or p.numel() == 0 else p.data_ptr() for p in params]
    struct = _Batch(batch.batch, batch.vocab, batch.pairs, rows, strides, dtypes, *ptr)
    return struct, [*matrices, *[p for p in params if p is not None]], [rows, strides, dtypes]


def _check(status: int) -> None:
    if status != 0:
        raise RuntimeError(f"native sampler failed: {_LIB.rast_error_string(status).decode()}")


def sample(batch: SamplingBatch) -> torch.Tensor:
    """int64 [B]: one token per row, -1 for rows with no admissible token."""
    out = torch.empty(batch.batch, dtype=torch.int64)
    if batch.batch == 0:
        return out
    struct, _tensors, _arrays = _prepare(batch, with_seed=True)
    _check(_LIB.rast_sample(ctypes.byref(struct), out.data_ptr(), torch.get_num_threads()))
    return out


def probs(batch: SamplingBatch) -> torch.Tensor:
    """float32 [B, V]: the distribution sample() draws from."""
    out = torch.empty(batch.batch, batch.vocab, dtype=torch.float32)
    if batch.batch == 0:
        return out
    struct, _tensors, _arrays = _prepare(batch, with_seed=False)
    _check(_LIB.rast_probs(ctypes.byref(struct), out.data_ptr(), out.stride(0), torch.get_num_threads()))
    return out
