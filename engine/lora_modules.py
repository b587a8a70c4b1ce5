"""Several RL models as LoRA adapters over one small base, chosen per request: ``LLM(M, small_base=S,
lora_modules={"math": dir, "code": dir})`` (``rast serve --lora-modules math=dir``, vLLM's flag), and a
request names its adapter with vLLM's ``lora_request`` (a LoRARequest, or the adapter's name), or the
server's ``model`` field. With ``max_loras`` above their number (vLLM's name), more load while the engine
serves: LLMEngine.load_lora_adapter, the server's /v1/load_lora_adapter, or a LoRARequest's path.

A request with adapter a decodes M + λ·(R_a − S), R_a being S plus adapter a; a request with none
decodes M alone (its R is S, so R − S is exactly zero). R is one view of S with max_loras slots in every
decoder projection (models/lora_slots.py: a token gets only its own slot's delta), so R is one forward
for all requests, stacked with S as a single adapter's R is: one KV cache for R, whatever the number of
adapters. On CUDA a step reads only the slots its tokens use (rast_kernels.lora_slots); the torch layer
ops read every slot's A and B. Which slot holds which adapter, the requests that wait for one, and the
prefix-cache root of each load (R's keys and values depend on the adapter): engine/lora_registry.py.

This module is what the configuration and the CLI read, without torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

from rast_engine.errors import RastError


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's LoRARequest: the adapter a request's RL model uses, by name. A name the engine has not
    loaded is loaded from ``lora_path`` into a free slot, or the request waits for one
    (engine/lora_registry.py); for a loaded name the path, when given, must be the one it was loaded from.
    ``lora_int_id`` is accepted for vLLM's signature and not read: adapters are known by name."""
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


def checked_lora_modules(modules: object, allow_empty: bool = False) -> dict[str, str]:
    """EngineConfig.lora_modules as {name: directory}; a RastError for any other shape."""
    if not isinstance(modules, dict) or not (modules or allow_empty):
        raise RastError(f"lora_modules must be a non-empty dict of {{name: adapter directory}}, got {modules!r}")
    out: dict[str, str] = {}
    for name, path in modules.items():
        if not isinstance(name, str) or not name:
            raise RastError(f"lora_modules names must be non-empty strings, got {name!r}")
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise RastError(f"lora_modules[{name!r}] must be an adapter directory, got {path!r}")
        out[name] = os.fspath(path)
    return out
