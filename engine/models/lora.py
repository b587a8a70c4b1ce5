"""An RL model given as a PEFT LoRA adapter over its base: ``small_rl`` (or an expert's rl) may be an
adapter directory (adapter_config.json + adapter_model.safetensors, as PEFT's save_pretrained writes
them) whose base is the pair's ``small_base``. RL fine-tuning with LoRA is common, and R − S is then
exactly the adapter's contribution.

R is a view of the loaded base (``view_of``): a model whose every tensor is the base's own, with each
adapted projection a LoraLinear computing x Wᵀ + (x Aᵀ)(s·B)ᵀ unmerged, as PEFT does, s = lora_alpha / r
(lora_alpha / √r with use_rslora; per module through rank_pattern and alpha_pattern, as PEFT matches them).
R costs no weight memory, and models.stacked runs R and S as one forward that reads each shared weight
once for both. Where the adapter adapts more than a dense model's decoder projections (an untied lm_head,
a mixture of experts' experts), it is merged instead into a copy of the base's weights: W_R = W_S + s · B A
in float32, rounded once to the model dtype (what a fully fine-tuned R saved in that dtype would hold).
tests/test_lora.py checks both against transformers' own loading of the adapter.

Anything in adapter_config.json that would change the forward beyond plain LoRA on linear layers (DoRA,
biases, modules_to_save, trainable tokens, activated LoRA, layer replication, an initialisation that
rewrites the base as PEFT loads the adapter: PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) is refused by name, as
are an lm_head LoRA over tied embeddings and an adapter tensor with no projection of the base to land in;
over a multimodal base, the modules of its vision tower and projector are skipped with a warning (they
never touch text). PEFT's copy of an adapted head's own weight must equal the base's.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from rast_engine.errors import ModelLoadError
from rast_engine.models.decoder import CausalLM
from rast_engine.models.loader import LANGUAGE_MODEL_PREFIXES, _safetensors

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
    # PEFT's saved copies of an adapted head's or embedding's weight must equal the base's; not over dummy
    # weights, which no copy equals
    check_copies: bool = True

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
                                 "does not implement (only plain LoRA on linear layers)")
        for key in ("rank_pattern", "alpha_pattern"):  # module-name regexes to positive numbers, as PEFT reads them
            _check_patterns(path, key, config.get(key))
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise ModelLoadError(f"{str(path)!r} has no {ADAPTER_WEIGHTS} (pickled adapter weights are never read)")
        return cls(path, config)

    @classmethod
    def of_role(cls, path: str | Path, role: str, base: str | Path) -> LoraAdapter:
        """from_dir, its errors naming ``role``; warned of when trained over another base than ``base``."""
        try:
            adapter = cls.from_dir(path)
        except ModelLoadError as e:
            raise ModelLoadError(f"{role}: {e}") from None
        adapter.check_base(base)
        return adapter

    def check_base(self, base: str | Path) -> None:
        """Warn when the base the adapter was trained over is a directory here, and not ``base``."""
        named = self.config.get("base_model_name_or_path")
        if isinstance(named, str) and Path(named).is_dir() and Path(named).resolve() != Path(base).resolve():
            logger.warning("the LoRA adapter %s was trained over %s, and is applied over %s", self.path, named, base)

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        """(r, s) of one adapted module (its name in the base model), as PEFT resolves the patterns."""
        def lookup(pattern_key: str, default: Any) -> Any:
            patterns = self.config.get(pattern_key) or {}
            key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
            return default if key is None else patterns[key]

        r, alpha = int(lookup("rank_pattern", self.config["r"])), float(lookup("alpha_pattern",
                                                                               self.config["lora_alpha"]))
        if r <= 0:
            raise ModelLoadError(f"{str(self.path)!r}: {module} has rank {r} (rank_pattern); a rank must be positive")
        return r, alpha / (math.sqrt(r) if self.config.get("use_rslora") else r)

    @torch.no_grad()
    def merge_into(self, model: CausalLM) -> None:
        """Add s · B A to every adapted projection's rows of ``model`` (the base's weights, loaded)."""
        for (param, start, rows), a, b, scale in self._deltas(model):
            target = param.narrow(0, start, rows)
            delta = (b.to(target.device) @ a.to(target.device)) * scale
            target.copy_((target.float() + delta).to(target.dtype))

    def view_of(self, base: CausalLM) -> Optional[CausalLM]:
        """R as ``base`` itself plus the adapter, unmerged: every weight is the base's own tensor (no copy),
        and each adapted projection a LoraLinear over the base's. None where the adapter adapts anything
        but a dense decoder layer's linear projections (then merge_into a copy of the base)."""
        return lora_view(base, self)

    def _deltas(self, model: CausalLM) -> list[tuple[tuple[torch.Tensor, int, int], torch.Tensor, torch.Tensor,
                                                       float]]:
        """(the slot of ``model`` each adapted module lands in, A, B, s), checked against the adapter file."""
        slots = model.weight_map()
        out = []
        with _safetensors(self.path / ADAPTER_WEIGHTS) as f:
            names = set(f.keys())
            for name in sorted(names):
                if not name.startswith(PREFIX):
                    raise ModelLoadError(f"{str(self.path)!r}: adapter tensor {name!r} is not PEFT's")
                if ".lora_A." in name or ".lora_B." in name:
                    continue
                # PEFT's save_embedding_layers: a copy of an adapted head's or embedding's own weight (a tied
                # head's is the embedding, which weight_map lists alone)
                ours = _our_name(name[len(PREFIX):].replace(".base_layer.", "."))
                if ours == "lm_head.weight" and model.config.tie_word_embeddings:
                    ours = "model.embed_tokens.weight"
                if ours not in slots or self.check_copies and not torch.equal(
                        f.get_tensor(name).to(slots[ours][0].device, slots[ours][0].dtype),
                        slots[ours][0].narrow(0, slots[ours][1], slots[ours][2])):
                    raise ModelLoadError(f"{str(self.path)!r}: adapter tensor {name!r} is neither LoRA's A nor B, "
                                         "nor a copy of the base's weight")
            for module in sorted({n[len(PREFIX):].rsplit(".lora_", 1)[0] for n in names if ".lora_" in n}):
                delta = self._module_delta(f, names, module, slots, model.config.tie_word_embeddings)
                if delta is not None:
                    out.append(delta)
        return out

    def _module_delta(self, f: Any, names: set[str], module: str, slots: dict, tied: bool) -> Optional[tuple]:
        """``module``: PEFT's name (rank_pattern and alpha_pattern match it); its slot: the engine's name."""
        ours = _our_name(module)
        if ours + ".weight" not in slots and any(part in module for part in NOT_TEXT):
            logger.warning("LoRA adapter %s: %s does not touch text and is not read", self.path, module)
            return None
        a_name, b_name = (f"{PREFIX}{module}.lora_{x}.weight" for x in "AB")
        if ours == "lm_head" and tied:
            raise ModelLoadError(f"{str(self.path)!r}: an lm_head LoRA over a base with tied embeddings would untie "
                                 "them; not supported")
        if a_name not in names or b_name not in names or ours + ".weight" not in slots:
            raise ModelLoadError(f"{str(self.path)!r}: adapter module {module!r} has no A and B pair or no "
                                 "projection of the base model to merge into")
        param, start, rows = slots[ours + ".weight"]
        a, b = f.get_tensor(a_name).float(), f.get_tensor(b_name).float()
        r, scale = self.rank_and_scale(module)
        if a.shape != (r, param.shape[1]) or b.shape != (rows, r):
            raise ModelLoadError(f"{str(self.path)!r}: {module}: lora_A {list(a.shape)} and lora_B "
                                 f"{list(b.shape)} do not fit the base's {[rows, param.shape[1]]} at rank {r}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):  # a diverged run's: 0 · inf is NaN anywhere
            raise ModelLoadError(f"{str(self.path)!r}: {module}: lora_A or lora_B holds NaN or infinite values")
        return (param, start, rows), a, b, scale


def shared_copy(base: CausalLM) -> CausalLM:
    """A copy of ``base`` whose every parameter, buffer, layer-ops and attention backend is base's own."""
    shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
    for obj in (base.ops, *(layer.self_attn.backend for layer in base.layers)):
        shared[id(obj)] = obj
    return copy.deepcopy(base, shared)


@torch.no_grad()
def lora_view(base: CausalLM, adapter: LoraAdapter) -> Optional[CausalLM]:
    """``base`` plus the adapter, unmerged, sharing every tensor of ``base``; None where the adapter adapts
    anything but a dense decoder layer's linear projections."""
    if base.config.num_experts:
        return None
    view = shared_copy(base)
    owners = {id(m.weight): (parent, name, m) for parent in view.layers.modules()
              for name, m in parent.named_children() if isinstance(m, nn.Linear)}
    parts: dict[int, list] = {}
    for (param, start, n), a, b, scale in adapter._deltas(view):
        if id(param) not in owners:
            return None
        parts.setdefault(id(param), []).append((start, n, a, b * scale))
    for key, linear_parts in parts.items():
        parent, name, linear = owners[key]
        total = sum(a.shape[0] for _, _, a, _ in linear_parts)
        lora_b = torch.zeros(linear.out_features, total)
        col = 0
        for start, n, a, b in linear_parts:  # each part's B in its rows, its own columns: block-diagonal
            lora_b[start:start + n, col:col + a.shape[0]] = b
            col += a.shape[0]
        setattr(parent, name, LoraLinear(linear, torch.cat([a for _, _, a, _ in linear_parts]), lora_b))
    return view


class LoraLinear(nn.Module):
    """A base model's nn.Linear (its own tensors) plus LoRA: y = base(x) + (x Aᵀ) Bᵀ, one delta for all the
    adapted parts of a fused projection (q/k/v, gate/up): A is their A's stacked, B block-diagonal with
    each part's scale folded in, so two small GEMMs a projection. ``weight`` and ``bias`` are the base's, so
    models.stacked sees the pair's shared weight and reads it once for both models. (Several adapters, one
    per token: models/lora_slots.py's SlotLoraLinear.)"""

    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(lora_a.to(device=device, dtype=dtype), requires_grad=False)
        self.lora_b = nn.Parameter(lora_b.to(device=device, dtype=dtype), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_to_(self.base(x), x)

    def add_to_(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y += this adapter's delta of x, in place (y is the fresh output of the base projection over x's
        rows), rounding once."""
        return y.addmm_(x @ self.lora_a.t(), self.lora_b.t())


def _check_patterns(path: Path, key: str, patterns: object) -> None:
    if patterns in (None, {}):
        return
    if not isinstance(patterns, dict):
        raise ModelLoadError(f"{str(path)!r}: adapter_config.json {key} must map module names to numbers")
    for name, value in patterns.items():
        try:
            re.compile(name)
        except (re.error, TypeError):
            raise ModelLoadError(f"{str(path)!r}: adapter_config.json {key} key {name!r} is not a regex") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ModelLoadError(f"{str(path)!r}: adapter_config.json {key}[{name!r}] must be a positive number, "
                                 f"got {value!r}")


def _our_name(module: str) -> str:
    """A module's name in the engine's model: a multimodal checkpoint's language model loses its prefix, as
    the loader reads its tensors (loader.LANGUAGE_MODEL_PREFIXES)."""
    for ours, theirs in LANGUAGE_MODEL_PREFIXES:
        if module.startswith(theirs):
            return ours + module[len(theirs):]
    return module
