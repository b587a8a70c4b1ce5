"""Callbacks that reach their object through a weak reference.

An object that holds a part and hands that part a callback of its own (the runner its CUDA graphs' stages,
the engine the scheduler's LoRA hooks) would otherwise form a reference cycle, which only Python's cyclic
GC frees: `del llm` would leave every weight and the KV cache in GPU memory until the GC happened to run.
"""
from __future__ import annotations

import inspect
import weakref
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def weak_method(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` itself unless it is a bound method; then a function calling it while its object lives."""
    if not inspect.ismethod(fn):
        return fn
    ref = weakref.WeakMethod(fn)
    name = fn.__qualname__

    def call(*args: Any, **kwargs: Any) -> T:
        method = ref()
        if method is None:
            raise RuntimeError(f"{name} called after its object was freed")
        return method(*args, **kwargs)

    return call
