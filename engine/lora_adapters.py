"""LLMEngine's LoRA API over its model_set.lora registry (engine/lora_registry.py): each request's adapter
slot, loads and unloads while serving, the stats, and the adapters requests wait for (a LoRARequest's
path finding no slot: the request waits, as in vLLM, and the scheduler loads its adapter between steps
once a slot can be freed and the request is admitted, through can_load_waiting_lora and load_waiting_lora)."""
from __future__ import annotations

from typing import Any, Optional, Union

from rast_engine.errors import ModelLoadError, RastError
from rast_engine.lora_modules import LoraChoice
from rast_engine.lora_registry import PendingLora
from rast_engine.sequence import SequenceGroup


class LoraAdapters:
    """Mixed into LLMEngine: its model_set.lora registry and the slots its live requests (groups) hold."""
    model_set: Any
    groups: dict[str, SequenceGroup]
    scheduler: Any
    refuse_while_weights_sleep: Any  # sleep_mode.py's

    def lora_choice(self, lora_request: LoraChoice, wait: bool = False) -> Union[tuple[int, bytes], PendingLora]:
        """A request's adapter slot and prefix-cache root; a LoRARequest with a path loads its adapter. With
        ``wait`` (a request that can wait in the queue) a PendingLora when its adapter finds no slot now."""
        if self.model_set.lora is None:
            if lora_request is None:
                return -1, b""
            raise RastError(f"lora_request {lora_request!r}: this engine serves no LoRA adapters (start it with "
                            "small_base and lora_modules, or max_loras)", param="lora_request")
        registry = self.model_set.lora
        name = getattr(lora_request, "lora_name", lora_request)
        if isinstance(name, str) and name not in registry.paths:  # it would be written into a slot
            self.refuse_while_weights_sleep(f"LoRA adapter {name!r}, not loaded,")
        return registry.choose(lora_request, self._lora_slots_in_use, wait)

    def wait_for_lora(self, group: SequenceGroup, pending: Optional[PendingLora]) -> None:
        """A new request's group waits on the adapter load lora_choice gave it (None: it has its slot)."""
        if pending is not None:
            self.model_set.lora.wait_for(pending, group)

    def forget_lora(self, group: SequenceGroup) -> None:
        """A request leaves (aborted) before its adapter loaded: nothing of its wait stays."""
        if group.lora_pending is not None:
            self.model_set.lora.forget(group)

    def can_load_waiting_lora(self) -> bool:
        """The scheduler's: whether load_waiting_lora would find a slot now (nothing is loaded or evicted)."""
        return self.model_set.lora.slot_to_free(self._lora_slots_held) is not None

    def load_waiting_lora(self, pending: PendingLora) -> bool:
        """The scheduler's: load an adapter waiting requests need into a slot, if one can be freed now
        (between steps, on the engine's thread); whether it did."""
        return self.model_set.lora.load_pending(pending, self._lora_slots_held)

    def load_lora_adapter(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter over small_base into a free slot, for requests to name (vLLM's
        /v1/load_lora_adapter); RastError when none is free or it does not fit (max_lora_rank)."""
        if self.model_set.lora is None:
            raise RastError("this engine holds no LoRA slots: start it with small_base and lora_modules or "
                            "max_loras", param="lora_name")
        self.refuse_while_weights_sleep("load_lora_adapter")
        try:
            self.model_set.lora.load(name, path, self._lora_slots_in_use)
        except ModelLoadError as e:
            raise RastError(str(e), param="lora_path") from None

    def unload_lora_adapter(self, name: str) -> None:
        """Free an adapter's slot (vLLM's /v1/unload_lora_adapter); refused while a request uses it."""
        if self.model_set.lora is None:
            raise RastError("this engine holds no LoRA slots", param="lora_name")
        self.refuse_while_weights_sleep("unload_lora_adapter")  # it clears the slot
        self.model_set.lora.unload(name, self._lora_slots_in_use)

    def lora_adapters(self) -> dict[str, str]:
        """The adapters loaded now, {name: directory}, in slot order."""
        return {} if self.model_set.lora is None else self.model_set.lora.modules

    def lora_stats(self) -> dict[str, Any]:
        """EngineStats' LoRA fields: the slots, and the adapters of running and of waiting sequences (those
        waiting for their adapter's slot included, as vLLM's waiting_lora_adapters)."""
        lora = self.model_set.lora
        if lora is None:
            return {}
        running = {lora.slots[s.group.lora_slot] for s in self.scheduler.running if s.group.lora_slot >= 0}
        waiting = {lora.slots[s.group.lora_slot] for s in self.scheduler.waiting if s.group.lora_slot >= 0}
        waiting.update(lora.pending)
        return dict(max_loras=len(lora.slots), lora_running=tuple(sorted(running)), lora_waiting=tuple(sorted(waiting)))

    def _lora_slots_in_use(self) -> set[int]:
        """The slots live requests use: admitted (running, preempted) or queued with their slot; a request
        waiting for its adapter's load uses none (lora_slot -1). Unloads and the loads of a request being
        added (or scored) take none of them: a new request never jumps the queue."""
        return {g.lora_slot for g in self.groups.values() if g.lora_slot >= 0}

    def _lora_slots_held(self) -> set[int]:
        """The slots admitted requests hold, which the scheduler's loads may not evict: it loads in queue
        order, so the requests queued with another slot are behind the load, and go back to waiting. When
        every slot holds an adapter pinned or run by a running sequence (the usual case while requests wait
        for a load, asked once a scheduling pass), the running sequences' slots alone: they leave no slot to
        free either, and cost O(running) instead of O(live requests)."""
        lora = self.model_set.lora
        held = {s.group.lora_slot for s in self.scheduler.running if s.group.lora_slot >= 0}
        if all(slot in held or name in lora.pinned for slot, name in enumerate(lora.slots)):  # no empty slot
            return held
        return {g.lora_slot for g in self.groups.values() if g.lora_slot >= 0 and g.admitted}

    def _lora_queued(self, slot: int) -> list[SequenceGroup]:
        """The live requests queued with ``slot`` that no step admitted yet, in arrival order."""
        return sorted((g for g in self.groups.values() if g.lora_slot == slot and not g.admitted),
                      key=lambda g: g.arrival)
