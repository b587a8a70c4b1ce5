"""Reading a LoRA adapter directory for the engine's slots (engine/lora_registry.py): a plain PEFT LoRA over
the small base, with the engine's tokenizer where it saved one, and the stamp of its files that tells a
kept host copy from a retrained adapter saved over it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rast_engine.errors import ModelLoadError
from rast_engine.models.lora import LoraAdapter, is_adapter


def adapter_rank(adapter: LoraAdapter) -> int:
    """The largest rank any module of the adapter has (its r, or a rank_pattern's)."""
    return max([int(adapter.config["r"]), *map(int, (adapter.config.get("rank_pattern") or {}).values())])


def read_adapter(name: str, path: str, base: str, check_copies: bool, tokenizer: Any = None) -> LoraAdapter:
    """The adapter at ``path``, checked as a plain LoRA over ``base`` whose tokenizer, where it saved one,
    is ``tokenizer`` (the engine's)."""
    from rast_engine.triple import saved_tokenizer_difference  # triple imports this

    if not Path(path).is_dir() or not is_adapter(path):
        raise ModelLoadError(f"LoRA adapter {name!r} ({path}) is not a PEFT LoRA adapter directory "
                             "(adapter_config.json, and no config.json of a model)")
    adapter = LoraAdapter.of_role(path, f"LoRA adapter {name!r}", base)
    adapter.check_copies = check_copies
    diff = saved_tokenizer_difference(tokenizer, path, f"LoRA adapter {name!r}")
    if diff is not None:
        raise ModelLoadError(f"the tokenizer of LoRA adapter {name!r} ({path}) differs from the model's: {diff}")
    return adapter


def files_stamp(path: str) -> tuple:
    """The names, sizes and modification times of a directory's files: a host copy of an adapter read from
    it is reused only while they are unchanged (a retrained adapter saved over it is read again)."""
    with os.scandir(path) as entries:
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file()))
