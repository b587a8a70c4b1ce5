"""A loaded model's weights replaced in place while the engine stays up (LLMEngine.load_weights), and
vLLM's reset_prefix_cache, as RL loops use them with vLLM: another RL checkpoint of the small model is tried
against M, or a training loop's latest R swapped in, without reloading M (minutes for a 32B model).

The tensors keep their addresses, so captured CUDA graphs, the stacked small models' views of their
tensors and the KV cache stay valid; on CUDA the copies run on the current stream, behind any step queued.
Invariants:
- all or nothing: every name, shape and dtype (and, where a weight is stored in FP8, finiteness: it needs
  a scale) is checked before the first tensor is written;
- only while no request is unfinished (its KV came from the old weights), or while paused
  (pausing.py: the requests kept go on with the new weights over their old KV, as in vLLM); each load
  starts a new prefix-cache root for the requests added after it and for those holding no block yet, so
  no block computed before is offered to them, and empties the prefix cache where no request holds it;
- a model whose tensors another role reads too is refused, since writing it would change the other: one
  directory given for two roles (one object), an RL model given as a LoRA adapter over its base, and
  lora_modules' slot view over small_base (adapters load through load_lora_adapter).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from rast_engine.errors import ModelLoadError, RastError
from rast_engine.models.config import ModelConfig
from rast_engine.models.decoder import CausalLM
from rast_engine.models.fp8 import fp8_owners
from rast_engine.models.loader import _safetensors, checkpoint_slots, slot_shape, write_file, write_weight

Named = Iterable[tuple[str, torch.Tensor]]


class WeightUpdates:
    """Mixed into LLMEngine: its model_set's models, replaced in place between steps."""
    model_set: Any
    scheduler: Any
    groups: dict[str, Any]
    refuse_while_weights_sleep: Any  # sleep_mode.py's
    device: torch.device
    weight_loads: int = 0

    def load_weights(self, weights: Optional[Named] = None, *, path: Optional[str | os.PathLike] = None,
                     role: str = "small_rl") -> int:
        """Write ``weights`` ((HF name, tensor) pairs, any subset of the model's; a tied model's lm_head.weight
        is its embedding's and is skipped), or the whole checkpoint at ``path`` (safetensors, a config.json of
        the same architecture, the same tokenizer where it has one), into the model of ``role`` (the
        engine's roles: "model", "small_rl", "small_base", "experts[k] rl", ...). How many tensors were
        written. RastError, with nothing written, for anything that does not fit, and while requests are
        unfinished unless the engine is paused (module docstring)."""
        if (weights is None) == (path is None):
            raise RastError("load_weights takes the weights or a checkpoint path, exactly one of them")
        self.refuse_while_weights_sleep("load_weights")
        model = self._updatable(role)
        if self.has_unfinished_requests() and not self.is_paused():
            raise RastError(f"load_weights while {len(self.groups)} requests are unfinished: their KV came from "
                            "the old weights; let them finish, or pause_generation first (mode 'keep' to go on "
                            "with them after the load)")
        try:
            writes, names = _from_checkpoint(model, Path(path), self.model_set.tokenizer) if path is not None \
                else _from_named(model, weights, role)
        except ModelLoadError as e:
            raise RastError(str(e), param="path" if path is not None else "weights") from None
        for write in writes:
            write()
        if self.device.type == "cuda":  # copies from pinned tensors are queued: the caller may reuse them after
            torch.cuda.current_stream(self.device).synchronize()
        self._written(role, names)
        self._new_weights_root()
        return len(names)

    @property
    def weights_root(self) -> bytes:
        """What every new request's prefix-cache root starts with (module docstring)."""
        return b"\0weights:%d" % self.weight_loads if self.weight_loads else b""

    def _new_weights_root(self) -> None:
        """Blocks computed before are found by no request that holds none yet (module docstring)."""
        self.weight_loads += 1
        for group in self.groups.values():
            if not any(s.block_table for s in group.seqs):
                group.weights_root = self.weights_root
        if not self.reset_prefix_cache() and not self.is_paused():
            raise RuntimeError("the prefix cache holds blocks of live sequences with no request unfinished")

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forget every block the prefix cache keeps, so later prompts recompute them (after a
        weight update). False, with nothing changed, while unfinished requests hold blocks."""
        return self.scheduler.bm.reset_prefix_cache()

    def _updatable(self, role: str) -> CausalLM:
        roles, models = self.model_set.roles, self.model_set.models
        if role not in roles:
            raise RastError(f"no model has role {role!r}; this engine's roles are {roles}", param="role")
        if role == "lora_modules":
            raise RastError("the lora_modules role is small_base with adapter slots: load adapters with "
                            "load_lora_adapter", param="role")
        model = models[roles.index(role)]
        same = [r for r, m in zip(roles, models) if m is model and r != role]
        if same:
            raise RastError(f"role {role!r} is the same loaded model as {same} (one directory): writing it would "
                            "change those too", param="role")
        ours = {p.data_ptr() for p, _, _ in model.weight_map().values()}
        shared = [r for r, m in zip(roles, models) if m is not model
                  and ours & {p.data_ptr() for p, _, _ in m.weight_map().values()}]
        if shared:
            raise RastError(f"role {role!r} shares its tensors with {shared} (a LoRA adapter over its base, or "
                            "adapter slots): writing them would change those too", param="role")
        return model


def _from_named(model: CausalLM, weights: Named, role: str) -> tuple[list[Callable[[], None]], list[str]]:
    """The checked writes of (name, tensor) pairs into ``model``, and the names they write."""
    slots, fp8, cfg = model.weight_map(), fp8_owners(model), model.config
    writes, written, seen = [], [], set()
    for entry in weights:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], torch.Tensor)):
            raise ModelLoadError(f"weights must be (name, tensor) pairs, got {type(entry).__name__}")
        name, tensor = entry
        if name in seen:
            raise ModelLoadError(f"tensor {name} is given twice")
        seen.add(name)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name not in slots:
            raise ModelLoadError(f"the {role} model has no tensor {name} (HF names, as in its checkpoint)")
        param, want = slots[name][0], slot_shape(slots[name])
        if tuple(tensor.shape) != want or not tensor.is_floating_point():
            raise ModelLoadError(f"tensor {name} is {tensor.dtype} {list(tensor.shape)}, expected a floating "
                                 f"tensor of shape {list(want)}")
        if id(param) in fp8 and not bool(torch.isfinite(tensor).all()):
            raise ModelLoadError(f"tensor {name} is not finite, and its weight is stored in FP8 (scaled)")
        writes.append(lambda s=slots[name], t=tensor, n=name: write_weight(s, t, n, fp8, cfg.norm_offset, role))
        written.append(name)
    return writes, written


def _from_checkpoint(model: CausalLM, path: Path, tokenizer: Any) -> tuple[list[Callable[[], None]], list[str]]:
    """The checked writes of the checkpoint at ``path`` into ``model`` (a file's tensors are read when it is
    written), and the names they write."""
    from rast_engine.triple import saved_tokenizer_difference  # triple imports us

    diff = model.config.differences(ModelConfig.from_dir(path))
    if diff:
        raise ModelLoadError(f"{str(path)!r} is another architecture: its config.json differs in {diff}")
    other = saved_tokenizer_difference(tokenizer, str(path), str(path))
    if other is not None:
        raise ModelLoadError(f"the tokenizer at {str(path)!r} differs from the engine's: {other}")
    fp8, offset, where = fp8_owners(model), model.config.norm_offset, repr(str(path))
    by_file = checkpoint_slots(path, model)
    for file, items in by_file.items():  # an FP8 weight needs finite values: read them once more to check
        with _safetensors(file) as f:
            for name, (param, _, _) in items:
                if id(param) in fp8 and not bool(torch.isfinite(f.get_tensor(name)).all()):
                    raise ModelLoadError(f"{where}: tensor {name} is not finite, and its weight is stored in FP8")
    return ([lambda file=file, items=items: write_file(file, items, fp8, offset, where)
             for file, items in by_file.items()], [name for items in by_file.values() for name, _ in items])
