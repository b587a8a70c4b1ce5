"""The OpenAI-compatible HTTP server (`rast serve`): protocol models, the async engine loop, the app."""
from __future__ import annotations

from rast_engine.errors import RastError

# The largest request body the server accepts (`rast serve --max-request-bytes`): a body is held in memory
# whole, so a bigger one is refused before it is read. Here, not in app.py, so the CLI can give the default
# without importing the server's dependencies.
MAX_REQUEST_BYTES = 64 << 20


def checked_api_key(key: str | None, name: str = "api_key") -> str | None:
    """The key, or None to serve without one. HTTP strips a header value's surrounding whitespace, so a
    key that is empty or has any could never be sent: refused, never a server that turns every request
    away (vLLM's empty key silently means none)."""
    if key is not None and (not key or key != key.strip()):
        raise RastError(f"{name} must be a non-empty key without leading or trailing whitespace (no client "
                         f"could send it in an Authorization header); leave it out to serve without one")
    return key
