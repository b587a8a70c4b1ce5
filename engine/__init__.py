"""rast_engine: a paged-KV decoding engine running a large base model and small (RL, base) pairs in
lockstep over one block table, sampling softmax((z_M + sum_k λ_k (z_Rk - z_Sk)) / T).

Exports resolve lazily so that `rast --help` and the CLI's argument parsing never import torch."""
from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any


def _installed_version() -> str:
    try:
        return importlib.metadata.version("rast")
    except importlib.metadata.PackageNotFoundError:  # a bare checkout on PYTHONPATH, not installed
        return "unknown"


__version__ = _installed_version()

_EXPORTS = {
    "LLM": "rast_engine.llm",
    "LLMEngine": "rast_engine.llm_engine",
    "EngineConfig": "rast_engine.config",
    "SamplingParams": "rast_engine.sampling_params",
    "StructuredOutputsParams": "rast_engine.structured_params",
    "RequestOutput": "rast_engine.outputs",
    "CompletionOutput": "rast_engine.outputs",
    "EngineStats": "rast_engine.outputs",
    "ScoreOutput": "rast_engine.outputs",
    "LoRARequest": "rast_engine.lora_modules",
    "BeamSearchParams": "rast_engine.beam_search",
    "BeamSearchOutput": "rast_engine.beam_search",
    "RastParts": "rast_engine.logits_processors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rast_engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
