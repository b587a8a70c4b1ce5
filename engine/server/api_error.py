"""The error every route answers a client's mistake with: an HTTP status and OpenAI's error body."""
from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error the server reports as an OpenAI-style JSON body with this HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}
