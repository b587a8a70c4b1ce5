"""stream_options on the wire: include_usage adds a last chunk with the request's usage (OpenAI's), and
vLLM's continuous_usage_stats puts the usage so far on every chunk too. The oracle for the counts is the
same request answered without streaming. And --enable-prompt-tokens-details' cached_tokens, against the
prefix cache's block arithmetic."""
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


def test_prompt_tokens_details_count_the_cache_hits_where_asked(server_triple: tuple, srv) -> None:  # noqa: ANN001
    from rast_engine.server.app import OpenAIServer
    from server_util import Running, server_engine

    running = Running(OpenAIServer(server_engine(server_triple), model_name=MODEL, enable_prompt_tokens_details=True))
    try:
        text = "details: " + " ".join(f"item{i}" for i in range(40))
        body = {"model": MODEL, "prompt": [text, text + " more"], "max_tokens": 2}
        first = httpx.post(f"{running.url}/v1/completions", json=body).json()["usage"]
        again = httpx.post(f"{running.url}/v1/completions", json=body).json()["usage"]
        block = running.server.engine.engine.config.block_size
        prompt = len(running.server.tokenizer.encode(text))
        # the second prompt extends the first: in the first request it may hit the blocks the first
        # computed, or not, as the two are scheduled; asked again, each reads its full blocks but the one
        # holding its last token
        assert again["prompt_tokens_details"]["cached_tokens"] == (prompt - 1) // block * block + \
            (again["prompt_tokens"] - prompt - 1) // block * block
        assert first["prompt_tokens_details"]["cached_tokens"] <= prompt // block * block
        stream = httpx.post(f"{running.url}/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}).text
        usage = json.loads(stream.split("data: ")[-2])["usage"]
        assert set(usage["prompt_tokens_details"]) == {"cached_tokens"}
    finally:
        running.close()
    plain = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": "the cat", "max_tokens": 1}).json()
    assert "usage" in plain, plain
    assert "prompt_tokens_details" not in plain["usage"]  # vLLM's default: not given
