"""The OpenAI-compatible HTTP server (`rast serve`): protocol models, the async engine loop, the app."""
