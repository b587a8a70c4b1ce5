"""Which LoRA adapter each slot of R's view holds (models/lora_slots.py), by name: the engine's lora_modules
loaded at start, adapters loaded while it serves (LLMEngine.load_lora_adapter, the server's vLLM route),
and those a LoRARequest names by path, loaded on first use as vLLM does. Slots are fixed in number
(max_loras) and width (max_lora_rank), so a load writes one slot in place and the captured graphs stay
valid. A slot is cleared only when no live request uses it: an unload of an adapter in use is refused,
and an adapter loaded by a LoRARequest's path is evicted, least recently chosen first, only when a slot
is needed and no request uses it (explicitly loaded ones stay until unloaded).

A request whose path adapter finds no slot now, every slot being held by live requests or pinned, waits
as in vLLM: its adapter, read and checked when it is added, is a PendingLora, loaded by the scheduler between
steps once a slot can be freed; the requests behind it that need no new slot go first. It is refused when
no slot can ever be freed (every slot pinned). While loads wait, an explicit load goes first but may not pin
the last slot they could take, and a score call, which cannot wait, loads an adapter only into a slot left
over once each waiting load has one (else it is refused): neither takes the queue's slots for good.

Each load gets its own prefix-cache root, so blocks computed under an adapter are never reused under
another, nor under a later adapter of the same name.
"""
from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from rast_engine.errors import ModelLoadError, RastError
from rast_engine.lora_files import files_stamp, read_adapter
from rast_engine.lora_modules import LoraChoice, LoRARequest
from rast_engine.models.decoder import CausalLM
from rast_engine.models.lora import LoraAdapter
from rast_engine.models.lora_slots import SlotDelta, clear_slot, page_locked, slot_deltas, write_slot

if TYPE_CHECKING:
    from rast_engine.sequence import SequenceGroup

DEFAULT_MAX_RANK = 16  # vLLM's max_lora_rank


@dataclass(eq=False)
class PendingLora:
    """An adapter a LoRARequest's path names that waits for a slot: read and checked when its first request
    was added (its deltas are what the load writes: the files are not read again), with the waiting requests
    that share its one load."""
    name: str
    path: str
    deltas: list[SlotDelta]
    groups: list[SequenceGroup] = field(default_factory=list)


class LoraRegistry:
    def __init__(self, view: CausalLM, base: str, max_loras: int, max_rank: int, check_copies: bool,
                 tokenizer: Any = None, host_copies: int = 0) -> None:
        self.view, self.base, self.max_rank, self.check_copies = view, base, max_rank, check_copies
        self.tokenizer = tokenizer  # the engine's: an adapter that saved another is refused
        self.slots: list[Optional[str]] = [None] * max_loras  # the name each slot holds
        self.paths: dict[str, str] = {}  # name -> its directory
        self.roots: dict[str, bytes] = {}  # name -> the prefix-cache root of its blocks
        self.pinned: set[str] = set()  # loaded explicitly: never evicted
        self.last_chosen: dict[str, int] = {}
        # name -> its load that live requests wait on, in the order of their first request; never a loaded
        # name, and while any waits some slot is not pinned (else they would wait forever)
        self.pending: dict[str, PendingLora] = {}
        # the live requests queued with a slot that no step admitted yet (the engine's): an eviction sends
        # them back to waiting for their adapter, whose deltas `kept` holds while it is loaded by path
        self.queued: Callable[[int], list[SequenceGroup]] = lambda slot: []
        # told after a waiting load is loaded, by the scheduler or a score call: its groups stop waiting (the
        # engine's scheduler, whose queue scans skip the requests that wait: Scheduler.lora_loaded)
        self.loaded: Callable[[], None] = lambda: None
        self.kept: dict[str, list[SlotDelta]] = {}
        # max_cpu_loras: adapters read by path, by resolved directory, least recently read first; an entry
        # holds the files' stamp when read, and is used only while the files still have it
        self.host: OrderedDict[str, tuple[tuple, list[SlotDelta]]] = OrderedDict()
        self.host_copies = host_copies
        self._loads, self._choices = itertools.count(), itertools.count()

    @property
    def modules(self) -> dict[str, str]:
        return {n: self.paths[n] for n in self.slots if n is not None}

    def load(self, name: str, path: str | os.PathLike, in_use: Callable[[], set[int]], pinned: bool = True,
             adapter: Optional[LoraAdapter] = None) -> int:
        """Read (unless ``adapter`` is the one read_adapter gave for ``path``), check and write adapter
        ``name`` into a free slot (evicting an unused path-loaded one); its slot. Nothing changes on an error.
        An explicit load (``pinned``: an administrator's, vLLM's /v1/load_lora_adapter) goes ahead of the
        loads requests wait for, since it is usable once it returns; but it never pins the last slot they
        could take, so they are never starved: at worst they wait for that slot's admitted requests to end."""
        path = os.fspath(path)
        if not isinstance(name, str) or not name:
            raise RastError(f"a LoRA adapter's name must be a non-empty string, got {name!r}")
        if name in self.paths:
            raise RastError(f"a LoRA adapter named {name!r} is already loaded (from {self.paths[name]}); unload it "
                            "first", param="lora_name")
        if name in self.pending:
            raise RastError(f"requests wait for a slot for LoRA adapter {name!r} (from {self.pending[name].path}); "
                            "it loads when one is free", param="lora_name")
        if pinned and self.pending and sum(n in self.pinned for n in self.slots) + 1 >= len(self.slots):
            raise RastError(f"requests wait for a LoRA slot for {sorted(self.pending)}: loading {name!r} "
                            "explicitly would leave no slot they could ever take", param="lora_name")
        deltas = self._deltas(name, path, adapter)
        slot = self._free_slot(in_use)
        if slot is None:
            raise self._no_slot()
        self._write(name, path, deltas, slot, pinned)
        return slot

    def unload(self, name: str, in_use: Callable[[], set[int]]) -> None:
        if name not in self.paths:
            waits = "; requests wait for a slot for it: abort them to drop it" if name in self.pending else ""
            raise RastError(f"no LoRA adapter named {name!r} is loaded (loaded: {sorted(self.paths)}){waits}",
                            param="lora_name")
        slot = self.slots.index(name)
        if slot in in_use():
            raise RastError(f"LoRA adapter {name!r} is used by live requests (running or queued); unload it once "
                            "they end", param="lora_name")
        self._drop(slot)

    def choose(self, choice: LoraChoice, in_use: Callable[[], set[int]],
               wait: bool = False) -> Union[tuple[int, bytes], PendingLora]:
        """A request's (slot, prefix-cache root): (-1, b"") for no adapter. A LoRARequest naming an adapter
        not loaded, with a path, loads it (evictable). With ``wait``, an adapter that finds no slot now (or
        that loads queued before it wait for) is a PendingLora, read and checked, for the request to wait on
        (wait_for). A RastError for anything else unknown, and when no slot can be freed (with ``wait``:
        ever, every slot being pinned). Without ``wait`` (scoring, which runs at once) a load, of a new adapter
        or of one requests wait for, leaves a slot for each other waiting load or is refused: it never takes
        a slot from the queue (_room_beside_queue)."""
        if choice is None:
            return -1, b""
        if isinstance(choice, str):
            choice = LoRARequest(choice)
        if not isinstance(choice, LoRARequest):
            raise RastError(f"lora_request must be a LoRARequest, an adapter name or None, got {choice!r}")
        name = choice.lora_name
        if name in self.paths:
            _same_path(choice, self.paths[name], "was loaded")
        elif name in self.pending:
            pending = self.pending[name]
            _same_path(choice, pending.path, "waits to be loaded")
            if wait:
                return pending
            self._room_beside_queue(name, in_use)
            if not self.load_pending(pending, in_use):
                raise self._no_slot()
        elif choice.lora_path is None:
            raise RastError(f"lora_request {name!r} is not a loaded LoRA adapter ({sorted(self.paths)}); give its "
                            "lora_path to load it", param="lora_request")
        else:
            path = os.fspath(choice.lora_path)
            try:
                deltas = self._deltas(name, path)
            except ModelLoadError as e:
                raise RastError(f"lora_request {name!r}: {e}", param="lora_request") from None
            # loads already waiting take freed slots first (FCFS among them: the scheduler loads them in order)
            if not wait:
                self._room_beside_queue(name, in_use)
            slot = None if wait and self.pending else self._free_slot(in_use)
            if slot is None:
                if not wait or all(n in self.pinned for n in self.slots):
                    raise self._no_slot()
                return PendingLora(name, path, deltas)
            self._write(name, path, deltas, slot, pinned=False)
        self.last_chosen[name] = next(self._choices)
        return self.slots.index(name), self.roots[name]

    def wait_for(self, pending: PendingLora, group: SequenceGroup) -> None:
        """``group`` (a new request, lora_slot -1) waits on ``pending``, which choose gave it."""
        if self.pending.setdefault(pending.name, pending) is not pending:
            raise RuntimeError(f"two waiting loads of LoRA adapter {pending.name!r}")
        pending.groups.append(group)
        group.lora_pending = pending

    def forget(self, group: SequenceGroup) -> None:
        """A waiting group leaves (aborted): its adapter's load is dropped with the last group waiting on it."""
        pending, group.lora_pending = group.lora_pending, None
        pending.groups.remove(group)
        if not pending.groups:
            del self.pending[pending.name]

    def load_pending(self, pending: PendingLora, in_use: Callable[[], set[int]]) -> bool:
        """Load a waiting adapter if a slot can be freed now; every group waiting on it then holds the slot
        and roots its prefix-cache blocks at this load. False (nothing changed) when none can."""
        slot = self._free_slot(in_use)
        if slot is None:
            return False
        self._write(pending.name, pending.path, pending.deltas, slot, pinned=False)
        del self.pending[pending.name]
        self.last_chosen[pending.name] = next(self._choices)
        for group in pending.groups:
            group.lora_slot, group.cache_root, group.lora_pending = slot, self.roots[pending.name], None
        self.loaded()
        return True

    def _deltas(self, name: str, path: str, adapter: Optional[LoraAdapter] = None) -> list[SlotDelta]:
        """The adapter at ``path`` read (unless given, or its host copy is fresh) and checked against the
        slots: what a load writes."""
        if adapter is not None:
            return slot_deltas(self.view, adapter, self.max_rank)
        key = _host_key(path)
        stamp = files_stamp(path) if Path(path).is_dir() else ()
        if key in self.host and self.host[key][0] == stamp:
            self.host.move_to_end(key)
            return self.host[key][1]
        deltas = slot_deltas(self.view, read_adapter(name, path, self.base, self.check_copies, self.tokenizer),
                             self.max_rank)
        self.host[key] = (stamp, deltas)
        self.host.move_to_end(key)
        while len(self.host) > self.host_copies:
            self.host.popitem(last=False)
        return deltas

    def _write(self, name: str, path: str, deltas: list[SlotDelta], slot: int, pinned: bool) -> None:
        locked = page_locked(deltas)  # the copies kept for reloads below are locked once, at their first load
        write_slot(self.view, slot, locked)  # queued behind the steps in flight, no host sync (see there)
        key = _host_key(path)
        if key in self.host and self.host[key][1] is deltas:
            self.host[key] = (self.host[key][0], locked)
        # in this order, and the reverse in _drop: the server reads `modules` from another thread
        self.paths[name], self.roots[name] = path, f"lora:{next(self._loads)}:{name}".encode()
        self.slots[slot] = name
        if pinned:
            self.pinned.add(name)
        else:
            self.kept[name] = locked

    def slot_to_free(self, in_use: Callable[[], set[int]]) -> Optional[int]:
        """The slot _free_slot would take, nothing changed: an empty one, or that of the least recently chosen
        path-loaded adapter no request of ``in_use`` holds; None if none."""
        if None in self.slots:
            return self.slots.index(None)
        idle = self._takeable(in_use())  # O(live requests): only when a slot must be freed
        return min(idle, key=lambda s: self.last_chosen.get(self.slots[s], -1)) if idle else None

    def _free_slot(self, in_use: Callable[[], set[int]]) -> Optional[int]:
        """slot_to_free's slot, emptied; None if none. The requests queued with its adapter wait for its reload."""
        slot = self.slot_to_free(in_use)
        if slot is None or self.slots[slot] is None:
            return slot
        name, queued = self.slots[slot], self.queued(slot)
        reload = PendingLora(name, self.paths[name], self.kept[name]) if queued else None
        self._drop(slot)
        for group in queued:
            group.lora_slot, group.cache_root = -1, b""
            self.wait_for(reload, group)
        return slot

    def _room_beside_queue(self, name: str, in_use: Callable[[], set[int]]) -> None:
        """A load that cannot wait (a score call's) of adapter ``name`` while requests wait for other loads:
        RastError unless the slots it could take (empty, or holding an adapter no live request uses nor
        pinned) outnumber those loads, so it leaves one for each. Its own waiting load, if any, it makes."""
        others = sorted(n for n in self.pending if n != name)
        if not others:
            return
        free = len(self._takeable(in_use()))  # O(live requests): only while loads wait
        if free == 0:
            raise self._no_slot()
        if free <= len(others):
            raise RastError(f"requests wait for LoRA slots for {others}, which load first: loading {name!r} now "
                            "would take a slot they need, and scoring cannot wait; retry once they are loaded, or "
                            "start the engine with a larger max_loras", param="lora_request")

    def _takeable(self, used: set[int]) -> list[int]:
        """The slots a load may take, in order: empty, or holding a path-loaded adapter that no request of
        ``used`` holds."""
        return [s for s, n in enumerate(self.slots) if n is None or s not in used and n not in self.pinned]

    def _no_slot(self) -> RastError:
        return RastError(f"all {len(self.slots)} LoRA slots (max_loras) hold adapters that are in use or loaded "
                         "explicitly; unload one, or start the engine with a larger max_loras", param="lora_request")

    def _drop(self, slot: int) -> None:
        name = self.slots[slot]
        clear_slot(self.view, slot)
        self.slots[slot] = None
        for table in (self.paths, self.roots, self.last_chosen, self.kept):
            table.pop(name, None)
        self.pinned.discard(name)


def _host_key(path: str) -> str:
    """An adapter directory's key among the host copies: its resolved path."""
    return str(Path(path).resolve())


def _same_path(choice: LoRARequest, path: str, state: str) -> None:
    """A LoRARequest naming a known adapter may give its path only as the one it is known by."""
    if choice.lora_path is not None and Path(choice.lora_path).resolve() != Path(path).resolve():
        raise RastError(f"lora_request {choice.lora_name!r} names {os.fspath(choice.lora_path)!r}, but that name "
                        f"{state} from {path!r}", param="lora_request")
