"""The error every route answers a client's mistake with: an HTTP status and OpenAI's error body."""
from __future__ import annotations

from typing import Any

from rast_engine.errors import NoAdmissibleToken, RequestFailed


class APIError(Exception):
    """An error the server reports as an OpenAI-style JSON body with this HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def step_failure(exc: NoAdmissibleToken | RequestFailed, request_id: str) -> APIError:
    """What a request named by an undone step's error is answered: 400 where its own masks may have emptied
    its draw (retrying it would fail again), else 500; 500 where its logits processor failed."""
    if isinstance(exc, RequestFailed):
        return APIError(500, str(exc), type="server_error", code="logits_processor_error")
    if request_id in exc.self_masked:
        return APIError(400, str(exc), type="invalid_request_error", code="no_admissible_token")
    return APIError(500, str(exc), type="server_error", code="no_admissible_token")
