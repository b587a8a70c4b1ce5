"""Per-request logits processors (vLLM V0's ``SamplingParams.logits_processors``) over RAST's combined logits.

A processor is a callable ``fn(output_ids, logits)`` or ``fn(prompt_ids, output_ids, logits)`` returning
logits, as vLLM's: ``logits`` is the row's combined z = M + Σ λ (R − S), float32 [V] on the engine's device,
after the masks, logit_bias and min_tokens' bans (logit_adjust.py); ``output_ids`` are the tokens the
sample has generated so far, ``prompt_ids`` its prompt's. What it returns goes on to the next processor,
then to the penalties, temperature and filters. Any non-finite value excludes its token, as any
non-finite input does in the sampler, so a processor cannot bring back a token whose z was already
non-finite (a model's own −inf).

rast's addition: a processor with a keyword parameter ``parts`` is also handed the row's RastParts, the
large model's logits, each pair's (rl, base) logits (float32 [V]) and λ per pair, so it can combine them
otherwise: gate the delta by the large model's entropy, clip it, weigh it per token.

Invariants: processors run on the host, one call a row, where the adjusted rows are sampled eagerly; they
read every output token on the host, so their request's steps are never launched ahead
(SamplingParams.reads_output). The draws of a request's n samples from its one prefilled row share one
call (their outputs are all empty). A processor may be called again for a position whose step was undone
(a failed launch, a preemption's recompute), so it should be a function of its arguments. A processor
that raises, or returns no logits row, fails its request alone (errors.RequestFailed). A server
request, `rast eval` and `rast generate` name them (server/processor_names.py, load_processor). Speculative
rounds refuse them: their drafts live on the device.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence as Seq

import torch

from rast_engine.errors import RastError, RequestFailed

if TYPE_CHECKING:
    from rast_engine.draws import Draw

PARAM = "logits_processors"


@dataclass(frozen=True)
class RastParts:
    """One row's models' logits (float32 [V], V the engine's vocabulary) and λ per pair."""
    large: torch.Tensor
    deltas: list[tuple[torch.Tensor, torch.Tensor]]  # (rl, base) per pair, in the engine's pair order
    weights: list[float]


@dataclass(frozen=True)
class Processor:
    fn: Callable[..., torch.Tensor]
    with_prompt: bool  # fn(prompt_ids, output_ids, logits); else fn(output_ids, logits)
    with_parts: bool  # called with parts=RastParts too


def as_processor(fn: object, index: int) -> Processor:
    """``fn`` checked by its signature: 2 or 3 positional parameters, and optionally ``parts``."""
    where = f"logits_processors[{index}]"
    if not callable(fn):
        raise RastError(f"{where} must be callable, got {fn!r}", param=PARAM)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        raise RastError(f"{where}: its signature cannot be read; wrap it in a def", param=PARAM) from None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "parts"]
    required = [p for p in positional if p.default is p.empty]
    if len(required) not in (2, 3) or len(positional) > 3:
        raise RastError(f"{where} must take (output_ids, logits) or (prompt_ids, output_ids, logits), "
                        f"got {len(required)} required positional parameters", param=PARAM)
    with_parts = any(p.name == "parts" and p.kind is not p.POSITIONAL_ONLY for p in params)
    return Processor(fn, len(required) == 3, with_parts)


def load_processor(qualname: str) -> Callable[..., torch.Tensor]:
    """The object a qualified name ("pkg.module.fn") names, imported (RastError naming the field if none)."""
    module, _, attr = qualname.rpartition(".")
    if not module or not attr:
        raise RastError(f"logits processor {qualname!r} is not a qualified name (module.attribute)", param=PARAM)
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise RastError(f"logits processor {qualname!r} cannot be loaded: {exc}", param=PARAM) from None


def as_processors(fns: object) -> Optional[list[Processor]]:
    """SamplingParams.logits_processors checked (None or an empty list: none)."""
    if fns is None:
        return None
    if not isinstance(fns, (list, tuple)):
        raise RastError(f"logits_processors must be a list of callables, got {fns!r}", param=PARAM)
    return [as_processor(fn, i) for i, fn in enumerate(fns)] or None


def run_row(processors: Seq[Processor], z: torch.Tensor, prompt_ids: list[int], output_ids: list[int],
            parts: Callable[[], RastParts]) -> torch.Tensor:
    """The row's z [V] after every processor in order; ``parts`` builds RastParts when one asks."""
    for i, p in enumerate(processors):
        args = (prompt_ids, output_ids, z) if p.with_prompt else (output_ids, z)
        out = p.fn(*args, parts=parts()) if p.with_parts else p.fn(*args)
        if not isinstance(out, torch.Tensor) or out.shape != z.shape or not out.is_floating_point():
            got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise RastError(f"logits_processors[{i}] must return a floating tensor of shape {tuple(z.shape)}, "
                            f"got {got}", param=PARAM)
        z = out.to(device=z.device, dtype=torch.float32)
    return z


def process_rows(z: torch.Tensor, draws: Seq[Draw], picked: Seq[torch.Tensor], vocab: int) -> None:
    """run_row on each row j of z [rows, V] whose draw has processors, in place; ``picked``: the rows'
    logits of every model [M, R1, S1, ...], for RastParts."""
    for j, d in enumerate(draws):
        if d.params.processors is None:
            continue
        prompt_ids, output_ids = d.adjust.token_ids

        @functools.cache
        def parts() -> RastParts:  # built once a row, and only if a processor asks (within this iteration)
            rows = [t[j, :vocab].float() for t in picked]
            return RastParts(rows[0], list(zip(rows[1::2], rows[2::2])), list(d.weights))
        try:
            z[j] = run_row(d.params.processors, z[j], prompt_ids, output_ids, parts)
        except Exception as exc:  # the request's own code: it fails that request, not the engine
            rid = d.adjust.request.group.request_id
            raise RequestFailed(f"request {rid!r}: {exc if isinstance(exc, RastError) else repr(exc)}", (rid,),
                                param=PARAM) from exc
