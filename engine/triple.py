"""Loading the model set (the large model plus one (rl, base) pair per expert) and checking it is one
decodable whole: every model must read the same token ids, so every tokenizer must be identical. A
directory that fills several roles (one base shared by several RL experts) is loaded once and runs once
per step. An RL model may be a LoRA adapter over its pair's base (models/lora.py): a view of the loaded
base with the adapter applied unmerged, or merged into a copy where a view cannot hold it. With
lora_modules (or max_loras), R is a view of its base with slots for adapters chosen per request, which a
LoraRegistry fills (engine/lora_registry.py).

V, the engine's vocabulary, is min(len(tokenizer), every model's vocab width): padded logit columns
beyond the tokenizer (Qwen2.5's 151936 vs 152064) are never sampled or scored.

With load_format="dummy" the directories need only config.json. If none of them has tokenizer files the
set has no tokenizer (None): prompts must be token ids, V is the smallest vocab width, and eos comes
from config.json / generation_config.json alone.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from rast_engine.attention.base import AttentionBackend
from rast_engine.models.layer_ops import LayerOps
from rast_engine.config import EngineConfig
from rast_engine.errors import ModelLoadError, RastError
from rast_engine.models.config import ModelConfig
from rast_engine.models.decoder import CausalLM
from rast_engine.models.loader import load_model
from rast_engine.lora_files import adapter_rank, read_adapter
from rast_engine.lora_registry import DEFAULT_MAX_RANK, LoraRegistry
from rast_engine.models.lora import LoraAdapter, is_adapter
from rast_engine.models.lora_slots import slot_view
from rast_engine.sampling_params import sample_seed

logger = logging.getLogger("rast")

SPECIAL_ATTRS = ("bos_token", "eos_token", "pad_token", "unk_token")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class ModelSet:
    models: list[CausalLM]  # per role: large, then rl_k, base_k per pair (one object per directory)
    configs: list[ModelConfig]
    roles: list[str]
    tokenizer: Any  # None: a dummy model set without tokenizer files (token-id prompts only)
    vocab_size: int
    eos_token_ids: set[int]  # every id that ends a sequence (unless ignore_eos)
    named_eos_ids: set[int]  # those of them that are its stop_reason: the generation config's, not the model's
    weights: list[float]  # the engine's λ per pair
    lora: Optional[LoraRegistry] = None  # with lora_modules: the adapters R's slots hold


def roles(config: EngineConfig) -> list[str]:
    out = ["model"]
    for i, _ in enumerate(config.pairs):
        if config.lora_modules is not None:
            out += ["lora_modules", "small_base"]
        elif i == 0 and config.small_rl is not None:
            out += ["small_rl", "small_base"]
        else:
            k = i - (1 if config.small_rl is not None else 0)
            out += [f"experts[{k}] rl", f"experts[{k}] base"]
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise RastError(f"unknown device {name!r}: {e}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise RastError(f"device must be 'auto', 'cpu' or 'cuda[:index]', got {name!r}")
    if not torch.cuda.is_available():
        raise RastError(f"device {name!r} requested but CUDA is not available")
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        raise RastError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def resolve_dtype(name: str, device: torch.device, large: ModelConfig) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32  # CPU half-precision matmuls are slow and the CPU path is the reference
    return large.torch_dtype if large.torch_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def load_tokenizer(path: str, role: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises OSError, ValueError, ... for an unusable directory
        raise ModelLoadError(f"{role} ({path}): cannot load its tokenizer: {e}") from None


def tokenizer_difference(a: Any, b: Any) -> str | None:
    """A short description of how tokenizer b differs from a, or None when they are identical."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb))[:3]
        only_b = sorted(set(vb) - set(va))[:3]
        moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])[:3]
        parts = [f"vocab sizes {len(va)} vs {len(vb)}"]
        if only_a:
            parts.append(f"tokens only in the first: {only_a}")
        if only_b:
            parts.append(f"tokens only in the second: {only_b}")
        if moved:
            parts.append("different ids for " + ", ".join(f"{t!r} ({va[t]} vs {vb[t]})" for t in moved))
        return "vocabularies differ: " + "; ".join(parts)
    for attr in SPECIAL_ATTRS:
        if getattr(a, attr, None) != getattr(b, attr, None):
            return f"{attr} differs: {getattr(a, attr, None)!r} vs {getattr(b, attr, None)!r}"
    if sorted(a.all_special_tokens) != sorted(b.all_special_tokens):
        return f"special tokens differ: {sorted(a.all_special_tokens)} vs {sorted(b.all_special_tokens)}"
    return None


def _id_list(value: Any) -> list[int]:
    return [] if value is None else [int(v) for v in value] if isinstance(value, list) else [int(value)]


def eos_token_ids(path: str, tokenizer: Any, generation_config: str = "auto") -> tuple[set[int], set[int]]:
    """(the ids that end a sequence, those of them that name themselves its stop_reason), as vLLM's: the
    model's EOS (the tokenizer's; config.json's without one) ends it with no stop_reason; the generation
    config's other eos ids (Llama-3 instruct lists several) end it as stop_token_ids do. The generation
    config is ``generation_config``'s directory's file ("auto" and "vllm": the model's), else that
    directory's config.json, as HF and vLLM fall back to the model config."""
    try:
        return _eos_token_ids(path, tokenizer, generation_config)
    except (TypeError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"{path!r}: eos_token_id must be an integer or a list of them ({e})") from None


def _eos_token_ids(path: str, tokenizer: Any, generation_config: str) -> tuple[set[int], set[int]]:
    if tokenizer is not None:
        model_eos = set(_id_list(tokenizer.eos_token_id))
    else:
        model_eos = set(_id_list(json.loads((Path(path) / "config.json").read_text()).get("eos_token_id")))
    where = Path(path if generation_config in ("auto", "vllm") else generation_config)
    listed = next((_id_list(json.loads((where / name).read_text()).get("eos_token_id"))
                   for name in ("generation_config.json", "config.json") if (where / name).is_file()), [])
    named = set(listed) - model_eos
    return model_eos | named, named


def has_tokenizer_files(path: str) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def saved_tokenizer_difference(tokenizer: Any, path: str, role: str) -> str | None:
    """How the tokenizer a directory saved differs from ``tokenizer`` (the engine's); None when they are
    identical, or when either is absent (a directory with no tokenizer files reads the engine's ids)."""
    if tokenizer is None or not has_tokenizer_files(path):
        return None
    return tokenizer_difference(tokenizer, load_tokenizer(path, role))


def load_tokenizers(config: EngineConfig, paths: list[str], names: list[str]) -> list[Any]:
    """One tokenizer per model; all None for a dummy set whose directories hold no tokenizer at all."""
    if config.load_format == "dummy":
        present = [has_tokenizer_files(p) for p in paths]
        if not any(present):
            return [None] * len(paths)
        if not all(present):
            lacking = [f"{r} ({p})" for p, r, ok in zip(paths, names, present) if not ok]
            raise ModelLoadError(f"some model directories have tokenizer files and {', '.join(lacking)} "
                                 "do not; give every model the same tokenizer, or none (token-id prompts)")
    return [load_tokenizer(p, r) for p, r in zip(paths, names)]


def dummy_seed(engine_seed: int, index: int) -> int:
    """Model ``index`` of the set gets its own weights, even when rl and base share a directory."""
    return sample_seed(engine_seed, index) & ((1 << 63) - 1)


def weight_sources(paths: list[str], names: list[str]) -> tuple[list[str], list[Optional[LoraAdapter]]]:
    """Per role, the directory its config and weights come from, and its LoRA adapter where the role's
    directory is one (an RL model over its pair's base, the next role: models/lora.py)."""
    sources: list[str] = []
    adapters: list[Optional[LoraAdapter]] = []
    for i, (path, role) in enumerate(zip(paths, names)):
        if not Path(path).is_dir():
            raise ModelLoadError(f"{role}: model directory {path!r} does not exist")
        if not is_adapter(path):
            sources.append(path)
            adapters.append(None)
            continue
        if i % 2 == 0:  # the large model and every base: roles 0, 2, 4, ...
            raise ModelLoadError(f"{role} ({path}) is a LoRA adapter; only an RL model may be one, over its pair's "
                                 "base model")
        adapters.append(LoraAdapter.of_role(path, role, paths[i + 1]))
        sources.append(paths[i + 1])
    return sources, adapters


def load_model_set(config: EngineConfig, device: torch.device, attention: AttentionBackend,
                   ops: LayerOps) -> ModelSet:
    paths, names = config.model_paths, roles(config)
    sources, adapters = weight_sources(paths, names)
    configs: list[ModelConfig] = []
    for source, role in zip(sources, names):  # every config first: cheap errors before any weight is read
        try:
            configs.append(ModelConfig.from_dir(source))
        except ModelLoadError as e:
            raise ModelLoadError(f"{role}: {e}") from None
    # an adapter's tokenizer where it saved one, else its base's
    tokenizers = load_tokenizers(config, [p if has_tokenizer_files(p) else s for p, s in zip(paths, sources)], names)
    for path, role, tok in zip(paths[1:], names[1:], tokenizers[1:]):
        diff = None if tok is None else tokenizer_difference(tokenizers[0], tok)
        if diff is not None:
            raise ModelLoadError(f"the tokenizer of {role} ({path}) differs from the tokenizer of model "
                                 f"({paths[0]}): {diff}. All models must share one tokenizer.")
    dtype = resolve_dtype(config.dtype, device, configs[0])
    models: dict[int, CausalLM] = {}
    loaded: dict[tuple, CausalLM] = {}  # a directory filling several roles (a base shared by experts) loads once
    lora = None
    for i in [0] + [j for rl in range(1, len(paths), 2) for j in (rl + 1, rl)]:  # a pair's base before its rl
        path, role = paths[i], names[i]
        if i == 1 and config.lora_modules is not None:  # R: slots over the base for adapters chosen per request
            lora = lora_registry(config, models[2], tokenizers[0])
            models[1] = lora.view
            continue
        quantization = config.quantization if i == 0 else None  # the large model only (models/fp8.py)
        key = (Path(path).resolve(), Path(sources[i]).resolve(), quantization)  # an adapter: over its base
        if config.load_format != "dummy" and key in loaded:  # dummy weights differ per role by design
            models[i] = loaded[key]
            continue
        try:
            models[i] = _load_role(config, i, sources[i], adapters[i], models.get(i + 1), device, dtype, attention,
                                   ops, quantization)
        except ModelLoadError as e:
            raise ModelLoadError(f"{role}: {e}") from None
        loaded[key] = models[i]
    tokenizer = tokenizers[0]
    vocab = min(([] if tokenizer is None else [len(tokenizer)]) + [c.vocab_size for c in configs])
    eos, named = eos_token_ids(paths[0], tokenizer, config.generation_config)
    return ModelSet(models=[models[i] for i in range(len(paths))], configs=configs, roles=names,
                    tokenizer=tokenizer, vocab_size=vocab, eos_token_ids=eos, named_eos_ids=named,
                    weights=[p.weight for p in config.pairs], lora=lora)


def lora_registry(config: EngineConfig, base: CausalLM, tokenizer: Any) -> LoraRegistry:
    """R's view of ``base`` with config.max_loras slots of config.max_lora_rank, lora_modules loaded in
    order (engine/lora_registry.py)."""
    check = config.load_format != "dummy"
    adapters = {n: read_adapter(n, p, config.small_base, check, tokenizer) for n, p in config.lora_modules.items()}
    rank = config.max_lora_rank or max(map(adapter_rank, adapters.values()), default=DEFAULT_MAX_RANK)
    slots = config.max_loras or len(adapters)
    registry = LoraRegistry(slot_view(base, slots, rank), config.small_base, slots, rank, check, tokenizer,
                            host_copies=config.max_cpu_loras or slots)
    for name, path in config.lora_modules.items():  # each read once, above
        registry.load(name, path, in_use=lambda: set(), adapter=adapters[name])  # noqa: PIE807 - nothing runs yet
    return registry


def _load_role(config: EngineConfig, i: int, source: str, adapter: Optional[LoraAdapter], base: Optional[CausalLM],
               device: torch.device, dtype: torch.dtype, attention: AttentionBackend, ops: LayerOps,
               quantization: Optional[str]) -> CausalLM:
    """Role i's model: loaded from ``source``; an adapter's, a view of its pair's loaded ``base`` (no
    weight copied: models/lora.py; over dummy weights too, so a benchmark's R is its base plus a real
    adapter), or the adapter merged into a copy where a view cannot hold it (ignored with dummy weights);
    """
    dummy = config.load_format == "dummy"
    if adapter is not None:  # with dummy weights too: the adapter's own A and B over the dummy base
        adapter = replace(adapter, check_copies=not dummy)
        view = adapter.view_of(base)
        if view is not None:
            return view
    model = load_model(source, device=device, dtype=dtype, attention=attention, load_format=config.load_format,
                       seed=dummy_seed(config.seed, i), ops=ops, quantization=quantization)
    if adapter is not None and not dummy:
        adapter.merge_into(model)
    return model
