"""`rast eval` over several variants in one engine: a λ sweep (``--lams``) and several RL adapters over one
small base (``--lora-modules``, engine/lora_modules.py), each (adapter, λ) a variant. The engine loads the
models once and mixes every variant's requests in its batches (λ and the adapter are per request), and
the λ variants of one problem share its prompt's prefix cache.

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
    name: str  # its folder in OUT: the adapter's name, "lam<λ>", or both joined by "-"
    lam: float
    lora: Optional[str]  # its adapter among the run's lora_modules; None: the run's small_rl
    small_rl: Optional[str]  # its RL model's directory, as a single run of it records


def variants(cfg: EvalConfig) -> Optional[list[Variant]]:
    """Every (adapter, λ) of the run, adapters first; None for a single run (neither option given)."""
    if cfg.lams is None and cfg.lora_modules is None:
        return None
    rls = list(cfg.lora_modules.items()) if cfg.lora_modules else [(None, cfg.small_rl)]
    out = []
    for lora, path in rls:
        for lam in cfg.lams or (cfg.lam,):
            parts = ([lora] if lora is not None else []) + ([f"lam{lam:g}"] if cfg.lams else [])
            out.append(Variant("-".join(parts), lam, lora, path))
    return out


def variant_config(cfg: EvalConfig, v: Variant) -> EvalConfig:
    """The single run variant ``v`` is: its folder, λ and RL model."""
    return dataclasses.replace(cfg, out=str(Path(cfg.out) / v.name), lam=v.lam, small_rl=v.small_rl, lams=None,
                               lora_modules=None)
