"""Client mistakes at the edges of the HTTP layer answer as documented (docs/serving.md), never as a 500:
JSON Python's int() refuses, a null assistant content replayed from a reasoning parser's reply, and a
client that leaves while its body is still arriving."""
from __future__ import annotations

import socket
import time

import httpx
import pytest
from rast_engine.server.api_error import APIError
from rast_engine.server.chat_messages import ChatMessage
from server_util import MODEL, Running


def _requests_by_status(url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("rast_requests_total{"):
            status = line.split('status="')[1].split('"')[0]
            counts[status] = counts.get(status, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_an_integer_past_pythons_digit_limit_is_a_400(srv: Running) -> None:
    huge = "9" * 5000  # int("9" * 5000) raises ValueError, not JSONDecodeError
    for path, body in (("/v1/completions", f'{{"model": "{MODEL}", "prompt": "hi", "max_tokens": {huge}}}'),
                       ("/tokenize", f'{{"prompt": "hi", "model": {huge}}}')):
        r = httpx.post(f"{srv.url}{path}", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], (path, r.text)


def test_an_assistant_reply_of_thinking_alone_replays() -> None:
    """deepseek_r1's reply cut before </think> has content null (as vLLM's); sent back, it is accepted."""
    replayed = ChatMessage(role="assistant", content=None, reasoning="2 + 2", reasoning_content="2 + 2")
    assert replayed.text() == "" and replayed.thinking() == "2 + 2"
    with pytest.raises(APIError, match="a user message needs content"):
        ChatMessage(role="user", content=None)


def test_a_client_leaving_mid_body_is_no_server_error(srv: Running) -> None:
    before = _requests_by_status(srv.url)
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b'Content-Length: 100\r\n\r\n{"model": "tiny-rast",')
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while _requests_by_status(srv.url).get("499", 0) <= before.get("499", 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    after = _requests_by_status(srv.url)
    assert after.get("499", 0) == before.get("499", 0) + 1 and after.get("500", 0) == before.get("500", 0)
    assert httpx.get(f"{srv.url}/health").status_code == 200
