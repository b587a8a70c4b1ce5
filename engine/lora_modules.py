"""Several RL models as LoRA adapters over one small base, chosen per request: ``LLM(M, small_base=S,
lora_modules={"math": dir, "code": dir})`` (``rast serve --lora-modules math=dir``, vLLM's flag), and a
request names its adapter with vLLM's ``lora_request`` (a LoRARequest, or the adapter's name), or the
server's ``model`` field.

A request with adapter a decodes M + λ·(R_a − S), R_a being S plus adapter a; a request with none
decodes M alone (its R is S, so R − S is exactly zero). Every adapter is loaded at start into one view
of S (models/lora.py: each adapted projection holds every adapter's A and B, and each token keeps only
its own adapter's columns), so R is one forward for all requests, stacked with S as a single adapter's
R is: one KV cache for R, whatever the number of adapters. Each step reads every adapter's A and B
(Σ r·(in + out) a projection), small against S's weights at the usual ranks and counts.

R's keys and values depend on the adapter, so the prefix cache roots a request's block hashes in its
adapter's name: a prompt reuses only blocks computed under the same adapter (vLLM keys them by LoRA id).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from rast_engine.errors import ModelLoadError, RastError

if TYPE_CHECKING:
    from rast_engine.models.lora import LoraAdapter


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's LoRARequest: the adapter a request's RL model uses, by name (one of the engine's
    lora_modules); ``lora_path``, when given, must be the directory that name was loaded from, and
    ``lora_int_id`` is accepted for vLLM's signature and not read (rast loads adapters at start only)."""
    lora_name: str
    lora_int_id: int = 1
    lora_path: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise RastError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id <= 0:
            raise RastError(f"lora_int_id must be a positive integer (vLLM's), got {self.lora_int_id!r}")
        if self.lora_path is not None and not isinstance(self.lora_path, (str, os.PathLike)):
            raise RastError(f"lora_path must be a directory path or None, got {self.lora_path!r}")


LoraChoice = Union[LoRARequest, str, None]


def checked_lora_modules(modules: object) -> dict[str, str]:
    """EngineConfig.lora_modules as {name: directory}; a RastError for any other shape."""
    if not isinstance(modules, dict) or not modules:
        raise RastError(f"lora_modules must be a non-empty dict of {{name: adapter directory}}, got {modules!r}")
    out: dict[str, str] = {}
    for name, path in modules.items():
        if not isinstance(name, str) or not name:
            raise RastError(f"lora_modules names must be non-empty strings, got {name!r}")
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise RastError(f"lora_modules[{name!r}] must be an adapter directory, got {path!r}")
        out[name] = os.fspath(path)
    return out


def load_adapters(modules: dict[str, str], base: str) -> list[LoraAdapter]:
    """Every module's adapter, in slot order (the dict's), each checked as a plain LoRA over ``base``."""
    from rast_engine.models.lora import LoraAdapter, is_adapter  # torch: not at import (the CLI's parsing)
    adapters = []
    for name, path in modules.items():
        if not Path(path).is_dir() or not is_adapter(path):
            raise ModelLoadError(f"lora_modules[{name!r}] ({path}) is not a PEFT LoRA adapter directory "
                                 "(adapter_config.json, and no config.json of a model)")
        adapters.append(LoraAdapter.of_role(path, f"lora_modules[{name!r}]", base))
    return adapters


def lora_choice(modules: Optional[dict[str, str]], choice: LoraChoice) -> tuple[int, bytes]:
    """A request's (adapter slot, prefix-cache root): (-1, b"") for none; a RastError for an adapter
    the engine has not loaded."""
    if choice is None:
        return -1, b""
    if isinstance(choice, str):
        choice = LoRARequest(choice)
    if not isinstance(choice, LoRARequest):
        raise RastError(f"lora_request must be a LoRARequest, an adapter name or None, got {choice!r}")
    if not modules:
        raise RastError(f"lora_request {choice.lora_name!r}: this engine serves no LoRA adapters (start it "
                        "with small_base and lora_modules)", param="lora_request")
    if choice.lora_name not in modules:
        raise RastError(f"lora_request {choice.lora_name!r} is not one of the engine's lora_modules "
                        f"{sorted(modules)}; rast loads adapters at start only", param="lora_request")
    loaded = modules[choice.lora_name]
    if choice.lora_path is not None and Path(choice.lora_path).resolve() != Path(loaded).resolve():
        raise RastError(f"lora_request {choice.lora_name!r} names {os.fspath(choice.lora_path)!r}, but that name "
                        f"was loaded from {loaded!r}", param="lora_request")
    return list(modules).index(choice.lora_name), b"lora:" + choice.lora_name.encode()
