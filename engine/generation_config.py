"""Default sampling parameters from a model's generation_config.json, as vLLM's `--generation-config`:
"auto" reads the large model's directory, a directory path reads that one (e.g. the RL model's, whose
recommended temperature a RAST user may want), "vllm" reads nothing.

Only the fields vLLM takes are read: temperature, top_p, top_k, min_p, repetition_penalty, and
max_new_tokens as max_tokens. `do_sample` is ignored, as vLLM does. The defaults fill what a caller
leaves unset: LLM.generate / chat without SamplingParams (LLM.get_default_sampling_params), a server
request's omitted fields, `rast generate`'s omitted flags. Unlike vLLM, max_new_tokens is a default only:
it never cuts a request's explicit max_tokens.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rast_engine.errors import ModelLoadError, RastError
from rast_engine.sampling_params import SamplingParams

logger = logging.getLogger("rast")

# generation_config.json's name -> SamplingParams'
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
# what each means when neither the caller nor the generation config sets it (SamplingParams' defaults,
# except max_tokens, which each entry point chooses: OpenAI's 16 for completions, the context's rest...)
FALLBACK = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def sampling_defaults(source: str, model: str) -> dict[str, Any]:
    """The SamplingParams fields the generation config sets (empty when it sets none, or for "vllm").
    ModelLoadError for a named directory without the file, or a file whose values SamplingParams refuses."""
    if source == "vllm":
        return {}
    path = Path(model if source == "auto" else source) / "generation_config.json"
    if not path.is_file():
        if source == "auto":
            return {}
        raise ModelLoadError(f"generation_config={source!r}: no generation_config.json in that directory")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: must hold a JSON object")
    defaults = {ours: data[theirs] for theirs, ours in FIELDS.items() if data.get(theirs) is not None}
    try:
        SamplingParams(**defaults)
    except RastError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    if defaults:
        logger.info("default sampling parameters from %s: %s (generation_config='vllm' ignores them)", path, defaults)
    if defaults.get("repetition_penalty", 1.0) != 1.0:
        logger.warning("%s sets repetition_penalty=%s for every request that does not set its own: penalized "
                       "batches sample eagerly (the forward still replays its CUDA graph; engine/logit_adjust.py); "
                       "generation_config='vllm' or a request's repetition_penalty=1 avoids it", path,
                       defaults["repetition_penalty"])
    return defaults


def fill(defaults: dict[str, Any], **given: Any) -> dict[str, Any]:
    """SamplingParams fields: each given value, else the generation config's, else FALLBACK's; a name
    without any of the three is left out (SamplingParams' own default applies)."""
    out = {}
    for name, value in given.items():
        value = defaults.get(name, FALLBACK.get(name)) if value is None else value
        if value is not None:
            out[name] = value
    return out
