"""`rast eval` over several variants in one engine: a λ sweep (``--lams``), several RL adapters over one
small base (``--lora-modules``, engine/lora_modules.py) or several full checkpoints of R
(``--rl-checkpoints``), each (RL model, λ) a variant. The engine loads the models once and mixes the
variants' requests in its batches (λ and the adapter are per request), and the λ variants of one problem
share its prompt's prefix cache; checkpoints run one after another, R's weights replaced in place between
them (LLMEngine.load_weights) once the engine has drained.

Variant v's samples go to OUT/<v.name>/ exactly as a single run of its settings saves them: its run.json
is that run's (small_rl the adapter's directory, lam its λ), and a sample's seed depends on (seed, problem,
index) alone, so a variant resumes from, or is compared with (`rast eval compare`), a single run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from rast_engine.evaluation.runner import EvalConfig


@dataclass(frozen=True)
class Variant:
    name: str  # its folder in OUT: the adapter's or checkpoint directory's name, "lam<λ>", or both joined by "-"
    lam: float
    lora: Optional[str]  # its adapter among the run's lora_modules; None: the run's small_rl
    small_rl: Optional[str]  # its RL model's directory, as a single run of it records


def variants(cfg: EvalConfig) -> Optional[list[Variant]]:
    """Every (RL model, λ) of the run, RL models first; None for a single run (no option given)."""
    if cfg.lams is None and cfg.lora_modules is None and cfg.rl_checkpoints is None:
        return None
    # (its part of the folder name, its adapter, its directory)
    rls = ([(name, name, path) for name, path in cfg.lora_modules.items()] if cfg.lora_modules else
           [(Path(path).name, None, path) for path in cfg.rl_checkpoints] if cfg.rl_checkpoints else
           [(None, None, cfg.small_rl)])
    out = []
    for part, lora, path in rls:
        for lam in cfg.lams or (cfg.lam,):
            parts = ([part] if part is not None else []) + ([f"lam{lam:g}"] if cfg.lams else [])
            out.append(Variant("-".join(parts), lam, lora, path))
    return out


def variant_config(cfg: EvalConfig, v: Variant) -> EvalConfig:
    """The single run variant ``v`` is: its folder, λ and RL model."""
    return dataclasses.replace(cfg, out=str(Path(cfg.out) / v.name), lam=v.lam, small_rl=v.small_rl, lams=None,
                               lora_modules=None, rl_checkpoints=None)
