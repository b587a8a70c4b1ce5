"""stream_options on the wire: include_usage adds a last chunk with the request's usage (OpenAI's), and
vLLM's continuous_usage_stats puts the usage so far on every chunk too. The oracle for the counts is the
same request answered without streaming."""
from __future__ import annotations

import json

import httpx
import pytest

from server_util import MODEL, PROMPTS, Running


def _events(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_continuous_usage_stats_count_up_to_the_final_usage(srv: Running, route: str) -> None:
    body = {"model": MODEL, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    body |= {"prompt": PROMPTS[1]} if route == "completions" else {"messages": [{"role": "user", "content": "hi"}]}
    url = f"{srv.url}/v1/{route}"
    whole = httpx.post(url, json=body, timeout=60).json()["usage"]
    chunks = _events(url, {**body, "stream": True,
                           "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    final, content = chunks[-1], [c for c in chunks[:-1] if c["choices"] and "role" not in c["choices"][0].get(
        "delta", {})]
    assert final["choices"] == [] and final["usage"] == whole
    counts = [c["usage"]["completion_tokens"] for c in content]
    assert counts == sorted(counts) and 1 <= counts[0] and counts[-1] == whole["completion_tokens"] == 8
    assert all(c["usage"]["prompt_tokens"] == whole["prompt_tokens"] for c in content)
    plain = _events(url, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert all("usage" not in c for c in plain[:-1]) and plain[-1]["usage"] == whole
