"""StructuredOutputsParams: what a request's output must match (engine/structured.py applies it). Kept
apart from the runtime so SamplingParams imports neither torch nor xgrammar."""
from __future__ import annotations

import json as json_text
from dataclasses import dataclass
from typing import Optional, Union

from rast_engine.errors import RastError

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass
class StructuredOutputsParams:
    """Exactly one constraint: ``json`` (a JSON schema, as a dict or its JSON text), ``json_object``
    (any JSON object), ``regex``, ``choice`` (one of these strings, exactly) or ``grammar`` (xgrammar's
    EBNF, with a ``root`` rule)."""
    json: Optional[Union[str, dict]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [k for k in KINDS if (getattr(self, k) is not None if k != "json_object" else self.json_object)]
        if len(given) != 1:
            raise RastError(f"structured_outputs takes exactly one of {KINDS}, got {given or 'none'}",
                            param="structured_outputs")
        if not isinstance(self.json_object, bool):
            raise RastError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}",
                            param="structured_outputs")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not (isinstance(getattr(self, name), str) and getattr(self, name)):
                raise RastError(f"structured_outputs.{name} must be a non-empty string", param="structured_outputs")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise RastError("structured_outputs.json must be a JSON schema (a dict or its JSON text)",
                            param="structured_outputs")
        if isinstance(self.json, str):  # one JSON value: xgrammar alone would compile the first of several
            try:
                json_text.loads(self.json)
            except ValueError as exc:
                raise RastError(f"structured_outputs.json is not one JSON value: {exc}",
                                param="structured_outputs") from None
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice or \
                    not all(isinstance(c, str) and c for c in self.choice):
                raise RastError("structured_outputs.choice must be a non-empty list of non-empty strings",
                                param="structured_outputs")
            self.choice = list(self.choice)


def kind(p: StructuredOutputsParams) -> str:
    """The one constraint ``p`` sets."""
    return next(k for k in KINDS if (p.json_object if k == "json_object" else getattr(p, k) is not None))
