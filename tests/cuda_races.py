"""Race detection for the CUDA emulator (cuda_emulator.py): every access to device memory is logged
with its stream's vector clock, and each new access is checked against the earlier accesses of the same
bytes on other streams. Two accesses conflict when one of them writes; a conflicting access that the new
access's stream has not waited for (directly or through other streams) is a race.

The log is pruned as it goes: an access supersedes an earlier one to bytes it covers when it is ordered
after it and at least as strong (a write, or a read superseding a read), since any later access that
conflicts with the old one then conflicts with the new one too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils._pytree import tree_flatten


class EmulatorError(AssertionError):
    """A use of streams or graphs that would be wrong, or fail, on a real GPU."""


class Clocked(Protocol):
    id: int
    clock: dict[int, int]  # the stream's vector clock: the last op of every stream it has waited for


@dataclass
class Access:
    lo: int
    hi: int
    stream: Clocked
    t: int  # the stream's clock at the access
    write: bool
    op: str


class AccessLog:
    def __init__(self) -> None:
        self.log: dict[int, list[Access]] = {}

    def access(self, op: str, stream: Clocked, read: list[torch.Tensor], written: list[torch.Tensor],
               fresh: list[torch.Tensor]) -> None:
        stream.clock[stream.id] += 1
        for t in fresh:
            if t.numel():
                key, lo, hi = _extent(t)
                self.log[key] = [e for e in self.log.get(key, []) if e.hi <= lo or hi <= e.lo]
        for t, write in [(t, False) for t in read] + [(t, True) for t in written + fresh]:
            if t.numel():
                self._check(op, stream, *_extent(t), write)

    def _check(self, op: str, stream: Clocked, key: int, lo: int, hi: int, write: bool) -> None:
        keep = []
        for e in self.log.get(key, []):
            if e.hi <= lo or hi <= e.lo:
                keep.append(e)
                continue
            ordered = e.stream is stream or e.t <= stream.clock.get(e.stream.id, 0)
            if not ordered and (write or e.write):
                raise EmulatorError(
                    f"race: {op} on {stream} {'writes' if write else 'reads'} bytes that {e.op} "
                    f"{'wrote' if e.write else 'read'} on {e.stream}, with no wait between them")
            if not (ordered and lo <= e.lo and e.hi <= hi and (write or not e.write)):
                keep.append(e)  # an ordered, covering, at least as strong access supersedes e
        keep.append(Access(lo, hi, stream, stream.clock[stream.id], write, op))
        self.log[key] = keep


def tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


LIFTS = ("aten::lift_fresh", "aten::lift_fresh_copy")


def aten_accesses(func: Any, args: tuple, kwargs: dict, out: Any) -> tuple[list, list, list]:
    """(read, written, freshly allocated) tensors of one aten op, from its schema; views access nothing.
    lift_fresh is how torch.tensor(data) meets the dispatcher: its schema says view, but its tensor was
    just allocated and filled by the host, outside any op, so it is fresh (else the bytes would keep
    the history of whatever tensor held that address before: a race reported between unrelated tensors)."""
    if func._schema.name in LIFTS:
        return [], [], tensors(out)
    if is_view(func):
        return ([], [], []) if aliases(args, kwargs, out) else (tensors((args, kwargs)), [], tensors(out))
    schema, written = func._schema, []
    named = dict(zip((a.name for a in schema.arguments), args), **kwargs)
    for a in schema.arguments:
        if a.alias_info is not None and a.alias_info.is_write and a.name in named:
            written += tensors(named[a.name])
    read = [t for t in tensors((args, kwargs)) if not any(t is w for w in written)]
    return read, written, [] if schema.is_mutable else tensors(out)


def _extent(t: torch.Tensor) -> tuple[int, int, int]:
    """(storage, first byte, one past the last byte) that ``t`` can touch."""
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    lo = t.storage_offset() * t.element_size()
    return t.untyped_storage().data_ptr(), lo, lo + span * t.element_size()


def is_view(func: Any) -> bool:
    """The schema says the result may alias an input (a view, or aten::to, which copies when it converts)."""
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def aliases(args: tuple, kwargs: dict, out: Any) -> bool:
    """Whether a may-alias op's results all share an input's storage. One that does not copied (t.int()
    of an int64 t is aten::to.dtype): its result is a fresh tensor computed from its inputs, which a
    replay must compute again, and whose bytes keep no history of what held that address before."""
    storages = {t.untyped_storage().data_ptr() for t in tensors((args, kwargs))}
    return all(t.untyped_storage().data_ptr() in storages for t in tensors(out))


def same_bytes(t: torch.Tensor, before: torch.Tensor) -> bool:
    as_bytes = (lambda x: x.contiguous().reshape(-1).view(torch.uint8))
    return torch.equal(as_bytes(t), as_bytes(before))
