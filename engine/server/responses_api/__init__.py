"""OpenAI's Responses API (``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``, ``POST
/v1/responses/{id}/cancel``), as vLLM serves it for text models.

A request is read as the chat completion it stands for (protocol.py: ``input`` items become chat messages,
``instructions`` the system message, ``tools`` chat tools, ``text.format`` the response format), so it is
rendered, sampled and parsed exactly as /v1/chat/completions would do it; output.py turns the chat choice's
parts into output items (a ``reasoning`` item for a reasoning parser's thinking, a ``message`` with its
``output_text``, a ``function_call`` per call) and the stream's ``response.*`` events. ``store`` keeps a
response (store.py, bounded, in memory) for ``previous_response_id`` and for ``GET``/``DELETE``;
``background`` runs one on after its POST has answered (background.py).

What the server does not have is refused with a 400 naming the field, never ignored: hosted tools (web
search, file search, MCP, ...), images and files in the input, ``truncation: "auto"``,
reasoning effort and summaries, encrypted reasoning. See docs/serving.md.
"""
