"""Counting what a piece of code runs on the device, on the CPU: every aten op that does work (not an
allocation, not a view) and every Triton launch, by name. Under TRITON_INTERPRET=1 the interpreter runs
aten ops of its own inside a kernel; those are the kernel's, not the caller's, and are not counted."""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty"}


@contextmanager
def count_device_ops(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter]:
    import triton.runtime.interpreter as interpreter

    ops: Counter = Counter()
    inside = [False]

    class CountAten(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = func.overloadpacket.__name__
            if not inside[0] and name not in ALLOCATIONS and not func.is_view:
                ops[name] += 1
            return func(*args, **(kwargs or {}))

    launch = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        ops[self.fn.__name__] += 1
        inside[0] = True
        try:
            return launch(self, *args, **kwargs)
        finally:
            inside[0] = False

    with monkeypatch.context() as patch:
        patch.setattr(interpreter.InterpretedFunction, "run", run)
        with CountAten():
            yield ops
