"""Which LoRA adapter each slot of R's view holds (models/lora_slots.py), by name: the engine's lora_modules
loaded at start, adapters loaded while it serves (LLMEngine.load_lora_adapter, the server's vLLM route),
and those a LoRARequest names by path, loaded on first use as vLLM does. Slots are fixed in number
(max_loras) and width (max_lora_rank), so a load writes one slot in place and the captured graphs stay
valid. A slot is cleared only when no live request uses it: an unload of an adapter in use is refused,
and an adapter loaded by a LoRARequest's path is evicted, least recently chosen first, only when a slot
is needed and no request uses it (explicitly loaded ones stay until unloaded).

Each load gets its own prefix-cache root, so blocks computed under an adapter are never reused under
another, nor under a later adapter of the same name.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from rast_engine.errors import ModelLoadError, RastError
from rast_engine.lora_modules import LoraChoice, LoRARequest
from rast_engine.models.decoder import CausalLM
from rast_engine.models.lora import LoraAdapter, is_adapter
from rast_engine.models.lora_slots import clear_slot, slot_deltas, write_slot

DEFAULT_MAX_RANK = 16  # vLLM's max_lora_rank


def adapter_rank(adapter: LoraAdapter) -> int:
    """The largest rank any module of the adapter has (its r, or a rank_pattern's)."""
    return max([int(adapter.config["r"]), *map(int, (adapter.config.get("rank_pattern") or {}).values())])


def read_adapter(name: str, path: str, base: str, check_copies: bool, tokenizer: Any = None) -> LoraAdapter:
    """The adapter at ``path``, checked as a plain LoRA over ``base`` whose tokenizer, where it saved one,
    is ``tokenizer`` (the engine's)."""
    from rast_engine.triple import has_tokenizer_files, load_tokenizer, tokenizer_difference  # triple imports this

    if not Path(path).is_dir() or not is_adapter(path):
        raise ModelLoadError(f"LoRA adapter {name!r} ({path}) is not a PEFT LoRA adapter directory "
                             "(adapter_config.json, and no config.json of a model)")
    adapter = LoraAdapter.of_role(path, f"LoRA adapter {name!r}", base)
    adapter.check_copies = check_copies
    if tokenizer is not None and has_tokenizer_files(path):
        diff = tokenizer_difference(tokenizer, load_tokenizer(path, f"LoRA adapter {name!r}"))
        if diff is not None:
            raise ModelLoadError(f"the tokenizer of LoRA adapter {name!r} ({path}) differs from the model's: {diff}")
    return adapter


class LoraRegistry:
    def __init__(self, view: CausalLM, base: str, max_loras: int, max_rank: int, check_copies: bool,
                 tokenizer: Any = None) -> None:
        self.view, self.base, self.max_rank, self.check_copies = view, base, max_rank, check_copies
        self.tokenizer = tokenizer  # the engine's: an adapter that saved another is refused
        self.slots: list[Optional[str]] = [None] * max_loras  # the name each slot holds
        self.paths: dict[str, str] = {}  # name -> its directory
        self.roots: dict[str, bytes] = {}  # name -> the prefix-cache root of its blocks
        self.pinned: set[str] = set()  # loaded explicitly: never evicted
        self.last_chosen: dict[str, int] = {}
        self._loads, self._choices = itertools.count(), itertools.count()

    @property
    def modules(self) -> dict[str, str]:
        return {n: self.paths[n] for n in self.slots if n is not None}

    def load(self, name: str, path: str | os.PathLike, in_use: Callable[[], set[int]], pinned: bool = True,
             adapter: Optional[LoraAdapter] = None) -> int:
        """Read (unless ``adapter`` is the one read_adapter gave for ``path``), check and write adapter
        ``name`` into a free slot (evicting an unused path-loaded one); its slot. Nothing changes on an error."""
        path = os.fspath(path)
        if not isinstance(name, str) or not name:
            raise RastError(f"a LoRA adapter's name must be a non-empty string, got {name!r}")
        if name in self.paths:
            raise RastError(f"a LoRA adapter named {name!r} is already loaded (from {self.paths[name]}); unload it "
                            "first", param="lora_name")
        if adapter is None:
            adapter = read_adapter(name, path, self.base, self.check_copies, self.tokenizer)
        deltas = slot_deltas(self.view, adapter, self.max_rank)
        slot = self._free_slot(in_use)
        write_slot(self.view, slot, deltas)
        if self.view.lm_head.weight.is_cuda:  # steps in flight read other slots only; the next one sees it all
            torch.cuda.synchronize(self.view.lm_head.weight.device)
        # in this order, and the reverse in _drop: the server reads `modules` from another thread
        self.paths[name], self.roots[name] = path, f"lora:{next(self._loads)}:{name}".encode()
        self.slots[slot] = name
        if pinned:
            self.pinned.add(name)
        return slot

    def unload(self, name: str, in_use: Callable[[], set[int]]) -> None:
        if name not in self.paths:
            raise RastError(f"no LoRA adapter named {name!r} is loaded (loaded: {sorted(self.paths)})",
                            param="lora_name")
        slot = self.slots.index(name)
        if slot in in_use():
            raise RastError(f"LoRA adapter {name!r} is used by running requests; unload it once they end",
                            param="lora_name")
        self._drop(slot)

    def choose(self, choice: LoraChoice, in_use: Callable[[], set[int]]) -> tuple[int, bytes]:
        """A request's (slot, prefix-cache root): (-1, b"") for no adapter. A LoRARequest naming an adapter
        not loaded, with a path, loads it (evictable); a RastError for anything else unknown."""
        if choice is None:
            return -1, b""
        if isinstance(choice, str):
            choice = LoRARequest(choice)
        if not isinstance(choice, LoRARequest):
            raise RastError(f"lora_request must be a LoRARequest, an adapter name or None, got {choice!r}")
        name = choice.lora_name
        if name in self.paths:
            loaded = self.paths[name]
            if choice.lora_path is not None and Path(choice.lora_path).resolve() != Path(loaded).resolve():
                raise RastError(f"lora_request {name!r} names {os.fspath(choice.lora_path)!r}, but that name was "
                                f"loaded from {loaded!r}", param="lora_request")
        elif choice.lora_path is None:
            raise RastError(f"lora_request {name!r} is not a loaded LoRA adapter ({sorted(self.paths)}); give its "
                            "lora_path to load it", param="lora_request")
        else:
            try:
                self.load(name, choice.lora_path, in_use, pinned=False)
            except ModelLoadError as e:
                raise RastError(f"lora_request {name!r}: {e}", param="lora_request") from None
        self.last_chosen[name] = next(self._choices)
        return self.slots.index(name), self.roots[name]

    def _free_slot(self, in_use: Callable[[], set[int]]) -> int:
        if None in self.slots:
            return self.slots.index(None)
        used = in_use()  # O(live requests): only when a slot must be freed
        idle = [(self.last_chosen.get(n, -1), s) for s, n in enumerate(self.slots)
                if s not in used and n not in self.pinned]
        if not idle:
            raise RastError(f"all {len(self.slots)} LoRA slots (max_loras) hold adapters that are in use or loaded "
                            "explicitly; unload one, or start the engine with a larger max_loras",
                            param="lora_request")
        slot = min(idle)[1]
        self._drop(slot)
        return slot

    def _drop(self, slot: int) -> None:
        name = self.slots[slot]
        clear_slot(self.view, slot)
        self.slots[slot] = None
        for table in (self.paths, self.roots, self.last_chosen):
            table.pop(name, None)
        self.pinned.discard(name)


class LoraAdapters:
    """LLMEngine's LoRA API: its model_set.lora registry and the slots its live requests (groups) hold."""
    model_set: Any
    groups: dict
    scheduler: Any

    def lora_choice(self, lora_request: LoraChoice) -> tuple[int, bytes]:
        """A request's adapter slot and prefix-cache root; a LoRARequest with a path loads its adapter."""
        if self.model_set.lora is None:
            if lora_request is None:
                return -1, b""
            raise RastError(f"lora_request {lora_request!r}: this engine serves no LoRA adapters (start it with "
                            "small_base and lora_modules, or max_loras)", param="lora_request")
        return self.model_set.lora.choose(lora_request, self._lora_slots_in_use)

    def load_lora_adapter(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter over small_base into a free slot, for requests to name (vLLM's
        /v1/load_lora_adapter); RastError when none is free or it does not fit (max_lora_rank)."""
        if self.model_set.lora is None:
            raise RastError("this engine holds no LoRA slots: start it with small_base and lora_modules or "
                            "max_loras", param="lora_name")
        try:
            self.model_set.lora.load(name, path, self._lora_slots_in_use)
        except ModelLoadError as e:
            raise RastError(str(e), param="lora_path") from None

    def unload_lora_adapter(self, name: str) -> None:
        """Free an adapter's slot (vLLM's /v1/unload_lora_adapter); refused while a request uses it."""
        if self.model_set.lora is None:
            raise RastError("this engine holds no LoRA slots", param="lora_name")
        self.model_set.lora.unload(name, self._lora_slots_in_use)

    def lora_adapters(self) -> dict[str, str]:
        """The adapters loaded now, {name: directory}, in slot order."""
        return {} if self.model_set.lora is None else self.model_set.lora.modules

    def lora_stats(self) -> dict[str, Any]:
        """EngineStats' LoRA fields: the slots, and the adapters of running and of waiting sequences."""
        lora = self.model_set.lora
        if lora is None:
            return {}
        running = {lora.slots[s.group.lora_slot] for s in self.scheduler.running if s.group.lora_slot >= 0}
        waiting = {lora.slots[s.group.lora_slot] for s in self.scheduler.waiting if s.group.lora_slot >= 0}
        return dict(max_loras=len(lora.slots), lora_running=tuple(sorted(running)), lora_waiting=tuple(sorted(waiting)))

    def _lora_slots_in_use(self) -> set[int]:
        return {g.lora_slot for g in self.groups.values() if g.lora_slot >= 0}
