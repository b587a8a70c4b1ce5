"""Stored responses (``store: true``): what ``GET /v1/responses/{id}`` returns and what
``previous_response_id`` continues.

In memory and bounded: at most ``capacity`` responses, the least recently used one forgotten first (a
continuation or a GET counts as a use). Each keeps its whole conversation as input items (its chain's
inputs and outputs, instructions excepted, as OpenAI does not carry them on), so a continuation never
depends on an ancestor that was forgotten. ``capacity`` 0 stores nothing: such a server answers with
``store: false``, and a previous_response_id is a 404.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

from rast_engine.errors import RastError


@dataclass(frozen=True)
class StoredResponse:
    body: dict[str, Any]
    conversation: list[dict[str, Any]]  # input items: its previous response's, its input, its output


class ResponseStore:
    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise RastError(f"the responses store's capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._kept: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, response_id: str, stored: StoredResponse) -> None:
        if self.capacity == 0:
            return
        self._kept[response_id] = stored
        self._kept.move_to_end(response_id)
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)

    def get(self, response_id: str) -> Optional[StoredResponse]:
        stored = self._kept.get(response_id)
        if stored is not None:
            self._kept.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        return self._kept.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._kept)
