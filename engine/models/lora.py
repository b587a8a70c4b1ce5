"""An RL model given as a PEFT LoRA adapter over its base: ``small_rl`` (or an expert's rl) may be an
adapter directory (adapter_config.json + adapter_model.safetensors, as PEFT's save_pretrained writes
them) whose base is the pair's ``small_base``. RL fine-tuning with LoRA is common, and R − S is then
exactly the adapter's contribution.

The adapter is merged into a copy of the base's weights at load: W_R = W_S + s · B A for each adapted
projection, s = lora_alpha / r (lora_alpha / √r with use_rslora; per module through rank_pattern and
alpha_pattern, as PEFT matches them), in float32 and then rounded once to the model dtype. R is then a
dense model like any other (stacked with S, captured in CUDA graphs), and its merged bf16 weights are what
a fully fine-tuned R saved in bf16 would hold. PEFT computes x Wᵀ + s · (x Aᵀ) Bᵀ unmerged instead: equal
in float32 to accumulation order (tests/test_lora.py checks the engine against transformers' own loading
of the adapter).

Anything in adapter_config.json that would change the forward beyond plain LoRA on linear layers (DoRA,
biases, modules_to_save, trainable tokens, activated LoRA, layer replication, an initialisation that
rewrites the base as PEFT loads the adapter: PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) is refused by name, as
are an lm_head LoRA over tied embeddings and an adapter tensor with no projection of the base to land in;
over a multimodal base, the modules of its vision tower and projector are skipped with a warning (they
never touch text). PEFT's copy of an adapted head's own weight must equal the base's.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rast_engine.errors import ModelLoadError
from rast_engine.models.decoder import CausalLM

logger = logging.getLogger("rast")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's name for the wrapped model in saved tensor names
# keys that do not change a merged plain-LoRA forward (training, initialisation, bookkeeping); any other
# key must be unset (None, False, empty) or be one this module reads
HARMLESS = {"task_type", "peft_type", "base_model_name_or_path", "revision", "inference_mode", "lora_dropout",
            "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "auto_mapping",
            "peft_version", "megatron_config", "megatron_core", "eva_config", "ensure_weight_tying",
            "qalora_group_size"}
READ = {"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "bias", "init_lora_weights"}
# initialisations that set only A and B; the others (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) rewrite the base's
# weight as PEFT loads the adapter, so W + s·BA would be the wrong R
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}
# a multimodal checkpoint's modules that never touch text (Gemma 3's vision tower and projector)
NOT_TEXT = ("vision_tower", "multi_modal_projector")


def is_adapter(path: str | Path) -> bool:
    """A PEFT adapter directory: adapter_config.json and no config.json of a model of its own."""
    return (Path(path) / ADAPTER_CONFIG).is_file() and not (Path(path) / "config.json").is_file()


@dataclass
class LoraAdapter:
    path: Path
    config: dict[str, Any]

    @classmethod
    def from_dir(cls, path: str | Path) -> LoraAdapter:
        path = Path(path)
        try:
            config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{str(path / ADAPTER_CONFIG)!r} cannot be read as JSON: {e}") from None
        if not isinstance(config, dict) or config.get("peft_type") != "LORA":
            raise ModelLoadError(f"{str(path)!r}: only LoRA adapters are supported (peft_type "
                                 f"{config.get('peft_type') if isinstance(config, dict) else None!r})")
        unsupported = sorted(k for k, v in config.items() if k not in HARMLESS | READ and v not in (None, False, {}, []))
        if config.get("bias", "none") != "none":
            unsupported.append(f"bias={config['bias']!r}")
        if config.get("init_lora_weights", True) not in PLAIN_INITS:
            unsupported.append(f"init_lora_weights={config['init_lora_weights']!r}")
        for key, default in PEFT_DEFAULTS.items():
            config[key] = config.get(key, default)
            if isinstance(config[key], bool) or not isinstance(config[key], (int, float)) or config[key] <= 0:
                raise ModelLoadError(f"{str(path)!r}: adapter_config.json {key} must be a positive number, "
                                     f"got {config[key]!r}")
        if unsupported:
            raise ModelLoadError(f"{str(path)!r}: adapter_config.json sets {', '.join(unsupported)}, which rast "
                                 "does not implement (plain LoRA on linear layers is merged into the weights)")
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise ModelLoadError(f"{str(path)!r} has no {ADAPTER_WEIGHTS} (pickled adapter weights are never read)")
        return cls(path, config)

    def check_base(self, base: str | Path) -> None:
        """Warn when the base the adapter was trained over is a directory here, and not ``base``."""
        named = self.config.get("base_model_name_or_path")
        if isinstance(named, str) and Path(named).is_dir() and Path(named).resolve() != Path(base).resolve():
            logger.warning("the LoRA adapter %s was trained over %s, and is merged into %s", self.path, named, base)

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        """(r, s) of one adapted module (its name in the base model), as PEFT resolves the patterns."""
        def lookup(pattern_key: str, default: Any) -> Any:
            patterns = self.config.get(pattern_key) or {}
            key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
            return default if key is None else patterns[key]

        r, alpha = int(lookup("rank_pattern", self.config["r"])), float(lookup("alpha_pattern",
                                                                               self.config["lora_alpha"]))
        return r, alpha / (math.sqrt(r) if self.config.get("use_rslora") else r)

    @torch.no_grad()
    def merge_into(self, model: CausalLM) -> None:
        """Add s · B A to every adapted projection's rows of ``model`` (the base's weights, loaded)."""
        from rast_engine.models.loader import _safetensors

        slots = model.weight_map()
        with _safetensors(self.path / ADAPTER_WEIGHTS) as f:
            names = set(f.keys())
            for name in sorted(names):
                if not name.startswith(PREFIX):
                    raise ModelLoadError(f"{str(self.path)!r}: adapter tensor {name!r} is not PEFT's")
                if ".lora_A." in name or ".lora_B." in name:
                    continue
                # PEFT's save_embedding_layers: a copy of an adapted head's or embedding's own weight
                ours = _our_name(name[len(PREFIX):].replace(".base_layer.", "."))
                if ours not in slots or not torch.equal(f.get_tensor(name).to(slots[ours][0].dtype),
                                                        slots[ours][0].narrow(0, slots[ours][1], slots[ours][2])):
                    raise ModelLoadError(f"{str(self.path)!r}: adapter tensor {name!r} is neither LoRA's A nor B, "
                                         "nor a copy of the base's weight")
            for module in sorted({n[len(PREFIX):].rsplit(".lora_", 1)[0] for n in names if ".lora_" in n}):
                self._merge_module(f, names, module, slots, model.config.tie_word_embeddings)

    def _merge_module(self, f: Any, names: set[str], module: str, slots: dict, tied: bool) -> None:
        """``module``: PEFT's name (rank_pattern and alpha_pattern match it); its slot: the engine's name."""
        ours = _our_name(module)
        if ours + ".weight" not in slots and any(part in module for part in NOT_TEXT):
            logger.warning("LoRA adapter %s: %s does not touch text and is not read", self.path, module)
            return
        a_name, b_name = (f"{PREFIX}{module}.lora_{x}.weight" for x in "AB")
        if ours == "lm_head" and tied:
            raise ModelLoadError(f"{str(self.path)!r}: an lm_head LoRA over a base with tied embeddings would untie "
                                 "them; not supported")
        if a_name not in names or b_name not in names or ours + ".weight" not in slots:
            raise ModelLoadError(f"{str(self.path)!r}: adapter module {module!r} has no A and B pair or no "
                                 "projection of the base model to merge into")
        param, start, rows = slots[ours + ".weight"]
        target = param.narrow(0, start, rows)
        a, b = f.get_tensor(a_name).float(), f.get_tensor(b_name).float()
        r, scale = self.rank_and_scale(module)
        if a.shape != (r, target.shape[1]) or b.shape != (target.shape[0], r):
            raise ModelLoadError(f"{str(self.path)!r}: {module}: lora_A {list(a.shape)} and lora_B "
                                 f"{list(b.shape)} do not fit the base's {list(target.shape)} at rank {r}")
        delta = (b.to(target.device) @ a.to(target.device)) * scale
        target.copy_((target.float() + delta).to(target.dtype))


def _our_name(module: str) -> str:
    """A module's name in the engine's model: a multimodal checkpoint's language model loses its prefix, as
    the loader reads its tensors (loader.LANGUAGE_MODEL_PREFIXES)."""
    from rast_engine.models.loader import LANGUAGE_MODEL_PREFIXES

    for ours, theirs in LANGUAGE_MODEL_PREFIXES:
        if module.startswith(theirs):
            return ours + module[len(theirs):]
    return module
