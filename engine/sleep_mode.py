"""vLLM's sleep mode: LLMEngine.sleep(level) gives the device memory of the weights and the KV cache back
while the engine stays constructed, so an RL trainer on the same GPU can use it between rollouts, and
wake_up(tags) takes it again.

- level 1: every tensor of the models is copied to host memory (pinned on CUDA), the KV cache discarded;
- level 2: the weights that load_weights writes are discarded too (the other tensors, rotary tables and
  such, are copied as at level 1); after waking, each model must be written again (load_weights, e.g. the
  trainer's latest R and the checkpoints of M and S) before a step runs.
wake_up(["weights"]) first and ["kv_cache"] after is vLLM's order for a trainer that loads weights in
between with little memory to spare.

Invariants:
- only with no request unfinished: the KV cache is discarded (pause_generation(mode="abort") first);
- a tensor keeps its storage object, which is emptied (resize to 0 bytes) and refilled, so every view of
  it (the stacked small models' views, tied embeddings) reads the same memory after waking; the data
  pointers change, so the CUDA graphs are dropped when the engine sleeps and captured again when all of
  it is awake;
- while any of it sleeps, or a weight discarded at level 2 is unwritten, step() raises;
- the KV cache wakes zero-filled and the prefix cache empty.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from rast_engine.errors import RastError

TAGS = ("weights", "kv_cache")


@dataclass
class _Stored:
    storage: torch.UntypedStorage
    nbytes: int
    host: Optional[torch.Tensor]  # its bytes while asleep; None: discarded (level 2)


@dataclass
class _Asleep:
    level: int
    weights: list[_Stored] = field(default_factory=list)
    kv: list[_Stored] = field(default_factory=list)
    tags: set[str] = field(default_factory=lambda: set(TAGS))


class SleepMode:
    """Mixed into LLMEngine."""
    model_set: Any
    kv: Any
    runner: Any
    _asleep: Optional[_Asleep] = None
    _unwritten: Optional[dict[str, set[str]]] = None  # role -> the names a level-2 sleep left to write

    def sleep(self, level: int = 1) -> None:
        """Free the device memory of the KV cache and of the weights (module docstring); sleeping again
        does nothing. RastError, with nothing changed, while requests are unfinished."""
        if level not in (1, 2):
            raise RastError(f"level must be 1 or 2, got {level!r}", param="level")
        if self._asleep is not None:
            return
        if self.has_unfinished_requests():
            raise RastError(f"sleep discards the KV cache of the {len(self.groups)} unfinished requests: let them "
                            "finish or abort them first (pause_generation(mode='abort'))")
        discard = self._discardable() if level == 2 else set()
        weights = _storages(t for m in self.model_set.models for t in (*m.parameters(), *m.buffers()))
        kv = _storages(t for pool in self.kv.pools for pair in pool for t in pair)
        fixed = sum(not s.resizable() for s in (*weights, *kv))
        if fixed:  # before anything is copied or freed
            raise RastError(f"{fixed} of the engine's tensors live in memory torch cannot free (mapped from a file?); "
                            "this engine cannot sleep")
        self._sync()
        asleep = _Asleep(level, kv=[_Stored(s, s.nbytes(), None) for s in kv])
        asleep.weights = [_Stored(s, s.nbytes(), None if s.data_ptr() in discard else _host_copy(s)) for s in weights]
        for graphs in (self.runner.graphs, self.runner.round_graphs):
            if graphs is not None:
                graphs.release()
        self._sync()
        for stored in (*asleep.weights, *asleep.kv):
            stored.storage.resize_(0)
        self.reset_prefix_cache()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._asleep = asleep

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Take the memory of ``tags`` ("weights", "kv_cache"; None: both) again; once all of it is awake,
        capture the CUDA graphs again."""
        wanted = set(TAGS if tags is None else tags)
        if not wanted <= set(TAGS):
            raise RastError(f"tags must be among {TAGS}, got {list(tags or [])}", param="tags")
        asleep = self._asleep
        if asleep is None:
            return
        if "weights" in wanted & asleep.tags:
            for stored in asleep.weights:
                target = _refill(stored, "weights", asleep.weights)
                if stored.host is None:
                    target.zero_()
                else:
                    target.copy_(stored.host, non_blocking=True)
            if asleep.level == 2:
                self._unwritten = {r: set(m.weight_map()) for r, m in zip(self.model_set.roles, self.model_set.models)}
            asleep.tags.discard("weights")
        if "kv_cache" in wanted & asleep.tags:
            for stored in asleep.kv:
                _refill(stored, "KV cache", asleep.kv).zero_()
            asleep.tags.discard("kv_cache")
        self._sync()  # the host copies are read before they are freed
        if not asleep.tags:
            self._asleep = None
            for graphs in (self.runner.graphs, self.runner.round_graphs):
                if graphs is not None:
                    graphs.capture_all()

    def is_sleeping(self) -> bool:
        return self._asleep is not None

    def refuse_while_weights_sleep(self, what: str) -> None:
        """RastError for what would read or write the weights (a load, a forward) while they sleep."""
        if self._asleep is not None and "weights" in self._asleep.tags:
            raise RastError(f"{what} while the weights sleep (sleep_mode.py): wake_up(['weights']) first")

    def _asleep_refusal(self) -> Optional[str]:
        if self._asleep is not None:
            return f"the engine sleeps ({sorted(self._asleep.tags)} released): call wake_up() first"
        if self._unwritten and any(self._unwritten.values()):
            roles = [r for r, names in self._unwritten.items() if names]
            return (f"a level-2 sleep discarded the weights of {roles}: write them with load_weights (a checkpoint "
                    "path, or every tensor) before running requests")
        return None

    def _written(self, role: str, names: Sequence[str]) -> None:
        if self._unwritten is not None and role in self._unwritten:
            self._unwritten[role] -= set(names)

    def _discardable(self) -> set[int]:
        """The storages level 2 discards: those of every weight load_weights writes. Refused where some
        role cannot be written (one model in two roles, tensors shared with another role)."""
        for role in self.model_set.roles:
            try:
                self._updatable(role)
            except RastError as e:
                raise RastError(f"sleep(level=2) discards weights that load_weights must write again, which this "
                                f"engine cannot do for every role ({e}); use level 1", param="level") from None
        return {p.untyped_storage().data_ptr() for m in self.model_set.models for p, _, _ in m.weight_map().values()}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _storages(tensors: Any) -> list[torch.UntypedStorage]:
    """Each tensor's storage, once, the empty ones left out."""
    seen: dict[int, torch.UntypedStorage] = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.nbytes() and s.data_ptr() not in seen:
            seen[s.data_ptr()] = s
    return list(seen.values())


def _refill(stored: _Stored, what: str, every: list[_Stored]) -> torch.Tensor:
    """The storage's memory taken again, as bytes. A device without room yet is a RastError; waking again
    later is safe (refilling a refilled storage allocates nothing, and its bytes are written again)."""
    try:
        stored.storage.resize_(stored.nbytes)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        total = sum(s.nbytes for s in every) / 2**30
        raise RastError(f"no device memory for the {what} ({total:.2f} GiB) yet: {str(e).splitlines()[0]}; free "
                        "some (the trainer's) and call wake_up again") from None
    return torch.empty(0, dtype=torch.uint8, device=stored.storage.device).set_(stored.storage)


def _host_copy(storage: torch.UntypedStorage) -> torch.Tensor:
    device = storage.device
    src = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
    host = torch.empty(src.numel(), dtype=torch.uint8, pin_memory=device.type == "cuda")
    return host.copy_(src, non_blocking=True)
