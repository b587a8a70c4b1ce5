"""The OpenAI-compatible HTTP server (`rast serve`): protocol models, the async engine loop, the app."""

# The largest request body the server accepts (`rast serve --max-request-bytes`): a body is held in memory
# whole, so a bigger one is refused before it is read. Here, not in app.py, so the CLI can give the default
# without importing the server's dependencies.
MAX_REQUEST_BYTES = 64 << 20
