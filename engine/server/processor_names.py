"""vLLM V0's ``logits_processors`` request field: SamplingParams.logits_processors (engine/logits_processors.py)
named in JSON. Each entry is a processor's qualified name ("pkg.module.fn": the callable itself) or
``{"qualname": ..., "args": [...], "kwargs": {...}}`` (a factory, called once per request, so a stateful
processor starts fresh each time).

A request may only load names that the whole of ``rast serve --logits-processor-pattern REGEX`` matches:
loading a name runs its module's import, so the operator decides which code requests can reach. Without
the flag the field is refused. Any failure (no such module or attribute, a factory that raises, a processor
of the wrong signature) is a 400 naming the field; nothing of the request reaches the engine.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict

from rast_engine.errors import RastError
from rast_engine.logits_processors import PARAM, load_processor
from rast_engine.server.api_error import APIError


class ProcessorConstructor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    qualname: str
    args: Optional[list[Any]] = None
    kwargs: Optional[dict[str, Any]] = None


def compiled_pattern(pattern: Optional[str]) -> Optional[re.Pattern[str]]:
    """--logits-processor-pattern, compiled (None: the field is refused)."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise RastError(f"--logits-processor-pattern {pattern!r} is not a regular expression: {exc}") from None


def resolve(specs: Optional[list[str | ProcessorConstructor]], pattern: Optional[re.Pattern[str]]
            ) -> Optional[list[Callable[..., Any]]]:
    """The request's processors, loaded (and constructed) if the server allows their names."""
    if specs is None:
        return None
    if pattern is None:
        raise APIError(400, "logits_processors needs rast serve --logits-processor-pattern REGEX (the qualified "
                            "names requests may load)", param=PARAM)
    processors = []
    for spec in specs:
        name = spec if isinstance(spec, str) else spec.qualname
        if not pattern.fullmatch(name):
            raise APIError(400, f"logits processor {name!r} is not allowed by this server's "
                                "--logits-processor-pattern", param=PARAM)
        try:
            obj = load_processor(name)
        except RastError as exc:
            raise APIError(400, str(exc), param=PARAM) from None
        if isinstance(spec, ProcessorConstructor):
            try:
                obj = obj(*(spec.args or []), **(spec.kwargs or {}))
            except Exception as exc:  # the factory is the operator's code; its failure is this request's
                raise APIError(400, f"logits processor {name!r}: its construction raised {exc!r}",
                               param=PARAM) from None
        processors.append(obj)
    return processors
