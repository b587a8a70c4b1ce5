"""`rast serve` end to end: the official openai client against our server on 127.0.0.1 over a tiny
random Qwen2 triple. The oracle is the offline engine (LLM.generate / LLM.chat) on the same models,
whose own correctness against HF transformers is tested in the engine's tests."""
from __future__ import annotations

import asyncio
import importlib.metadata
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rast_engine import LLM, SamplingParams
from rast_engine.errors import RastError
from rast_engine.server.app import OpenAIServer
from server_util import MODEL, PROMPTS, Running, metrics, server_engine


def test_models_health_and_greedy_completion(srv: Running, server_oracle: LLM) -> None:
    client = srv.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{srv.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{srv.url}/version").json() == {"version": importlib.metadata.version("rast")}
    res = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    want = server_oracle.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert res.choices[0].text == want.outputs[0].text
    assert res.choices[0].finish_reason == want.outputs[0].finish_reason
    assert res.usage.prompt_tokens == len(want.prompt_token_ids)
    assert res.usage.completion_tokens == len(want.outputs[0].token_ids)
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens


def test_batch_prompts_and_token_ids(srv: Running, server_oracle: LLM) -> None:
    ids = server_oracle.get_tokenizer().encode(PROMPTS[2])
    res = srv.client().completions.create(model=MODEL, prompt=[PROMPTS[1], PROMPTS[3]], max_tokens=6,
                                          temperature=0, n=2)
    want = server_oracle.generate([PROMPTS[1], PROMPTS[3]], SamplingParams(temperature=0, max_tokens=6, n=2),
                           use_tqdm=False)
    assert [c.index for c in res.choices] == [0, 1, 2, 3]
    assert [c.text for c in res.choices] == [c.text for o in want for c in o.outputs]
    by_ids = srv.client().completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    by_text = srv.client().completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_chat_uses_the_template_and_streams(srv: Running, server_oracle: LLM) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "3 + 5 ="}]
    client = srv.client()
    res = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    want = server_oracle.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == want.outputs[0].text
    assert res.usage.prompt_tokens == len(want.prompt_token_ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == want.outputs[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.outputs[0].token_ids)


def test_completion_stream_wire_format(srv: Running) -> None:
    body = {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and all("usage" not in c for c in chunks[:-1])
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    full = httpx.post(f"{srv.url}/v1/completions", json={**body, "stream": False, "stream_options": None},
                      timeout=60).json()
    assert text == full["choices"][0]["text"] and usage == full["usage"]


def test_streamed_text_offsets_equal_the_whole_response(srv: Running) -> None:
    """A stop string holds the text's tail back while the stream sends the tokens; each text_offset still
    counts the strings of all tokens before it, as the non-streamed response does (it restarted at the
    characters sent)."""
    body = {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 12, "temperature": 0, "logprobs": 1,
            "stop": ["zzzzzz"]}
    full = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    tokens, offsets = [], []
    with httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for chunk in (json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")):
            if chunk["choices"] and chunk["choices"][0]["logprobs"]:
                tokens += chunk["choices"][0]["logprobs"]["tokens"]
                offsets += chunk["choices"][0]["logprobs"]["text_offset"]
    assert tokens == full["tokens"] and len(tokens) == 12
    assert offsets == full["text_offset"] == [sum(map(len, tokens[:i])) for i in range(12)]


def test_bad_chat_and_the_server_keeps_serving(srv: Running) -> None:
    client = srv.client()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="tool_choice"):  # OpenAI's rule: tool_choice needs tools
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], tool_choice="required")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", extra_body={"lam": "strong"})
    with pytest.raises(openai.BadRequestError, match="one number per pair"):  # the engine has one pair
        client.completions.create(model=MODEL, prompt="hi", extra_body={"lam": [1.0, 2.0]})
    assert httpx.get(f"{srv.url}/v1/nothing").status_code == 404
    res = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0)
    assert res.usage.completion_tokens >= 1


def _wait_idle(url: str, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["rast_requests_in_flight"] == 0 and m["rast_num_requests_running"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"server did not go idle: {m}")
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_blocks(srv: Running) -> None:
    before = _wait_idle(srv.url)
    assert before["rast_kv_blocks_used"] == 0
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert metrics(srv.url)["rast_kv_blocks_used"] > 0
    after = _wait_idle(srv.url)
    assert after["rast_kv_blocks_used"] == 0
    generated = after["rast_generation_tokens_total"] - before["rast_generation_tokens_total"]
    assert 1 <= generated < 400  # aborted, not run to max_tokens


def test_32_concurrent_streams_all_finish(srv: Running, server_oracle: LLM) -> None:
    prompts = [f"{i} + {i % 7} =" for i in range(32)]
    want = server_oracle.generate(prompts, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None]:
        text, finish = "", None
        async for chunk in await client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                                           temperature=0, stream=True):
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main() -> list[tuple[str, str | None]]:
        async with openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    got = asyncio.run(main())
    assert got == [(o.outputs[0].text, o.outputs[0].finish_reason) for o in want]
    assert _wait_idle(srv.url)["rast_kv_blocks_used"] == 0


def test_metrics_parse(srv: Running) -> None:
    srv.client().completions.create(model=MODEL, prompt="hi", max_tokens=2)
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{srv.url}/metrics").text)}
    for name in ("rast_requests", "rast_prompt_tokens", "rast_generation_tokens", "rast_kv_blocks_used",
                 "rast_num_requests_waiting", "rast_step_seconds", "rast_spec_draft_tokens",
                 "rast_spec_accepted_tokens"):
        assert name in fams, name
    assert fams["rast_spec_draft_tokens"].samples[0].value == 0  # this server does not speculate
    ok = [s for s in fams["rast_requests"].samples
          if s.name == "rast_requests_total" and s.labels == {"endpoint": "completions", "status": "200"}]
    assert ok and ok[0].value >= 1
    steps = [s for s in fams["rast_step_seconds"].samples if s.name == "rast_step_seconds_count"]
    assert steps[0].value > 0
    assert metrics(srv.url)["rast_kv_blocks_total"] == 256


def test_disconnect_of_a_plain_request_aborts_it(srv: Running) -> None:
    before = _wait_idle(srv.url)
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.url}/v1/completions", json=body, timeout=0.5)
    after = _wait_idle(srv.url)
    assert after["rast_kv_blocks_used"] == 0
    assert after["rast_generation_tokens_total"] - before["rast_generation_tokens_total"] < 400
    text = httpx.get(f"{srv.url}/metrics").text
    statuses = {s.labels["status"] for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name == "rast_requests_total" and s.labels["endpoint"] == "completions"}
    assert "499" in statuses and "500" not in statuses  # recorded as a client disconnect, not a crash


def test_a_non_ascii_api_key_matches_its_utf8_bytes(server_triple: tuple[Path, Path, Path]) -> None:
    from starlette.requests import Request

    from rast_engine.server.protocol import APIError

    server = OpenAIServer(server_engine(server_triple), model_name=MODEL, api_key="sëcret")

    def request(header: bytes) -> Request:
        return Request({"type": "http", "headers": [(b"authorization", header)]})

    server._authorize(request("Bearer sëcret".encode()))  # what clients send: UTF-8
    for wrong in ("Bearer sëcret".encode("latin-1"), b"Bearer secret", b""):
        with pytest.raises(APIError) as info:
            server._authorize(request(wrong))
        assert info.value.status == 401


def test_api_key_and_capacity(server_triple: tuple[Path, Path, Path]) -> None:
    server = OpenAIServer(server_engine(server_triple, max_num_seqs=1), model_name=MODEL, api_key="sekret",
                          max_waiting=1, queue_timeout=0.5)
    running = Running(server)
    try:
        with pytest.raises(openai.AuthenticationError):
            running.client().models.list()
        r = httpx.post(f"{running.url}/v1/completions", json={"model": MODEL, "prompt": "the"},
                       headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{running.url}/health").status_code == 200
        client = running.client("sekret")
        assert client.models.list().data[0].id == MODEL
        # one running (max_num_seqs=1) and one waiting (max_waiting=1): a third request gets a 429,
        # and the waiting one a 503 once it has waited queue_timeout without being scheduled
        body = {"model": MODEL, "prompt": "the", "max_tokens": 500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=60,
                          headers={"Authorization": "Bearer sekret"}) as r:
            lines = r.iter_lines()  # keep a reference: a collected iterator closes the response
            assert next(lines).startswith("data: ")
            waiting: list[Any] = []
            waiter = threading.Thread(target=lambda: waiting.append(
                httpx.post(f"{running.url}/v1/completions", timeout=60, headers={"Authorization": "Bearer sekret"},
                           json={"model": MODEL, "prompt": "the", "max_tokens": 2})))
            waiter.start()
            deadline = time.monotonic() + 2.0
            while metrics(running.url)["rast_requests_in_flight"] < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError, match="over capacity"):
                client.completions.create(model=MODEL, prompt="the", max_tokens=2)
            waiter.join()
            assert waiting[0].status_code == 503 and waiting[0].json()["error"]["code"] == "queue_timeout"
        _wait_idle(running.url)
        assert client.completions.create(model=MODEL, prompt="the", max_tokens=2).usage.completion_tokens >= 1
    finally:
        running.close()


def test_engine_failure_is_reported_not_hidden(server_triple: tuple[Path, Path, Path]) -> None:
    engine = server_engine(server_triple, max_num_seqs=4)
    running = Running(OpenAIServer(engine, model_name=MODEL))
    try:
        body = {"model": MODEL, "prompt": "the", "max_tokens": 500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")

            def broken() -> None:
                raise RuntimeError("device lost")
            engine.step = broken  # type: ignore[method-assign]
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and "device lost" in events[-2]
        health = httpx.get(f"{running.url}/health")
        assert health.status_code == 503 and "device lost" in health.json()["error"]["message"]
        assert health.json()["error"]["code"] == "engine_dead"  # it had none
        r2 = httpx.post(f"{running.url}/v1/completions", json={"model": MODEL, "prompt": "the"})
        assert r2.status_code == 503 and r2.json()["error"]["code"] == "engine_dead"
        assert metrics(running.url)["rast_engine_healthy"] == 0
    finally:
        running.close()


def test_a_body_over_the_limit_is_refused_before_it_is_held(server_triple: tuple[Path, Path, Path]) -> None:
    """413 for a body over max_request_bytes: declared by Content-Length (refused before it is read) or
    streamed without one (refused once the bytes read pass the limit); a body within it is served, and
    the server serves on."""
    running = Running(OpenAIServer(server_engine(server_triple), model_name=MODEL, max_request_bytes=2000))
    try:
        url = f"{running.url}/v1/completions"
        small = {"model": MODEL, "prompt": "the cat", "max_tokens": 2}
        big = {"model": MODEL, "prompt": "the cat " * 400, "max_tokens": 2}  # about 3.2 kB
        r = httpx.post(url, json=big, timeout=60)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # noqa: ANN202 - no Content-Length: sent chunked
            for _ in range(8):
                yield b" " * 500
        r = httpx.post(url, content=chunks(), headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 413 and "2000 bytes" in r.json()["error"]["message"]
        r = httpx.post(url, json=small, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        r = httpx.post(f"{running.url}/tokenize", json={"model": MODEL, "prompt": "the cat " * 400}, timeout=60)
        assert r.status_code == 413
        with pytest.raises(RastError, match="max_request_bytes"):
            OpenAIServer(server_engine(server_triple), model_name=MODEL, max_request_bytes=0)
    finally:
        running.close()
