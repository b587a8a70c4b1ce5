"""`rast serve` end to end: the official openai client against our server on 127.0.0.1 over a tiny
random Qwen2 triple. The oracle is the offline engine (LLM.generate / LLM.chat) on the same models,
whose own correctness against HF transformers is tested in the engine's tests."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
from factories import make_triple
from prometheus_client.parser import text_string_to_metric_families

from rast_engine import LLM, SamplingParams
from rast_engine.server.app import OpenAIServer
from server_util import MODEL, Running, metrics, server_engine

PROMPTS = ["the cat sat on", "what is the answer?", "3 + 5 =", "hello world! this"]


@pytest.fixture(scope="module")
def triple(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_triple(tmp_path_factory.mktemp("server-triple"))


@pytest.fixture(scope="module")
def oracle(triple: tuple[Path, Path, Path]) -> LLM:
    large, rl, base = triple
    return LLM(str(large), str(rl), str(base), lam=1.0, device="cpu", dtype="float32", kv_cache_blocks=256)


@pytest.fixture(scope="module")
def srv(triple: tuple[Path, Path, Path]) -> Iterator[Running]:
    running = Running(OpenAIServer(server_engine(triple, max_num_seqs=32), model_name=MODEL))
    yield running
    running.close()


def test_models_health_and_greedy_completion(srv: Running, oracle: LLM) -> None:
    client = srv.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{srv.url}/health").json() == {"status": "ok"}
    res = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    want = oracle.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert res.choices[0].text == want.outputs[0].text
    assert res.choices[0].finish_reason == want.outputs[0].finish_reason
    assert res.usage.prompt_tokens == len(want.prompt_token_ids)
    assert res.usage.completion_tokens == len(want.outputs[0].token_ids)
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens


def test_batch_prompts_and_token_ids(srv: Running, oracle: LLM) -> None:
    ids = oracle.get_tokenizer().encode(PROMPTS[2])
    res = srv.client().completions.create(model=MODEL, prompt=[PROMPTS[1], PROMPTS[3]], max_tokens=6,
                                          temperature=0, n=2)
    want = oracle.generate([PROMPTS[1], PROMPTS[3]], SamplingParams(temperature=0, max_tokens=6, n=2),
                           use_tqdm=False)
    assert [c.index for c in res.choices] == [0, 1, 2, 3]
    assert [c.text for c in res.choices] == [c.text for o in want for c in o.outputs]
    by_ids = srv.client().completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    by_text = srv.client().completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_chat_uses_the_template_and_streams(srv: Running, oracle: LLM) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "3 + 5 ="}]
    client = srv.client()
    res = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    want = oracle.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
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


def test_extra_body_fields(srv: Running, triple: tuple[Path, Path, Path]) -> None:
    client = srv.client()
    greedy = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0)
    # top_k=1 and min_p=1 both leave only the argmax, so sampling at T=1 must reproduce greedy
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        res = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=1.0,
                                        seed=3, extra_body=extra)
        assert res.choices[0].text == greedy.choices[0].text, extra
    # λ = 0 removes the small pair: the large model alone, loaded without it, is the oracle
    alone = LLM(str(triple[0]), device="cpu", dtype="float32", kv_cache_blocks=64)
    want = alone.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    for lam in (0.0, [0.0]):  # a number, or a list of one per small pair
        res = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                        extra_body={"lam": lam})
        assert res.choices[0].text == want.outputs[0].text, lam


def test_penalties_reach_the_engine(srv: Running, oracle: LLM) -> None:
    penalties = dict(presence_penalty=0.8, frequency_penalty=1.5, repetition_penalty=1.3)
    want = oracle.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, **penalties), use_tqdm=False)[0]
    plain = oracle.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert want.outputs[0].text != plain.outputs[0].text  # else this test could not tell them apart
    res = srv.client().completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                          presence_penalty=0.8, frequency_penalty=1.5,
                                          extra_body={"repetition_penalty": 1.3})
    assert res.choices[0].text == want.outputs[0].text


def test_logit_bias_and_min_tokens_reach_the_engine(srv: Running, oracle: LLM) -> None:
    plain = oracle.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    ban = {plain.token_ids[0]: -100.0, 7: 2.0}
    want = oracle.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, logit_bias=ban),
                           use_tqdm=False)[0].outputs[0]
    assert want.token_ids[0] != plain.token_ids[0]
    res = srv.client().completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                          logit_bias={str(t): b for t, b in ban.items()})
    assert res.choices[0].text == want.text
    # a stop string the greedy text reaches early is not matched before min_tokens (vLLM's rule), so
    # the output runs on; the stop token it ends with is masked until then
    full = oracle.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    res = srv.client().completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                          stop=[full.text[2:4]], extra_body={"min_tokens": 10})
    assert (res.choices[0].text, res.choices[0].finish_reason) == (full.text, "length")
    res = srv.client().completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                          extra_body={"min_tokens": 4, "stop_token_ids": [full.token_ids[1]]})
    assert res.usage.completion_tokens > 4  # 2 without min_tokens


def test_special_tokens_and_kept_stop_strings_reach_the_engine(srv: Running, oracle: LLM) -> None:
    tok = oracle.get_tokenizer()
    forced = {str(tok.eos_token_id): 100.0}  # EOS every step; ignore_eos keeps going
    client = srv.client()
    for skip in (True, False):
        res = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0,
                                        logit_bias=forced, extra_body={"ignore_eos": True, "skip_special_tokens": skip})
        assert res.choices[0].text == ("" if skip else tok.eos_token * 3)
    full = oracle.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    stop = full.text[3:5]
    for stream in (False, True):
        res = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0, stop=[stop],
                                        stream=stream, extra_body={"include_stop_str_in_output": True})
        text = "".join(c.choices[0].text for c in res) if stream else res.choices[0].text
        assert text == full.text[:full.text.find(stop) + len(stop)]


def test_stop_strings_streamed_and_not(srv: Running, oracle: LLM) -> None:
    full = oracle.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    stop = full.outputs[0].text[4:6]  # a string the greedy text is known to reach
    want = oracle.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12, stop=[stop]),
                           use_tqdm=False)[0].outputs[0]
    assert want.finish_reason == "stop"
    client = srv.client()
    res = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0, stop=[stop])
    assert (res.choices[0].text, res.choices[0].finish_reason) == (want.text, "stop")
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_requests_are_reproducible(srv: Running) -> None:
    client = srv.client()

    def draw(seed: int) -> list[str]:
        res = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=1.0,
                                        n=3, seed=seed)
        return [c.text for c in res.choices]

    first = draw(11)
    assert draw(11) == first
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=1.0,
                                       n=3, seed=11, stream=True)
    texts = ["", "", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == first


def test_logprobs(srv: Running, oracle: LLM) -> None:
    res = srv.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                          logprobs=2)
    want = oracle.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, logprobs=2),
                           use_tqdm=False)[0].outputs[0]
    lp = res.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([d[t] for t, d in zip(want.token_ids, want.logprobs)])
    assert all(len(top) == 2 for top in lp.top_logprobs)
    # streamed: each token's logprobs exactly once, carried by the chunk that shows its text
    chunks = list(srv.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                                  logprobs=2, stream=True))
    assert [x for c in chunks for x in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs
    assert "".join(c.choices[0].text for c in chunks) == res.choices[0].text
    chat = srv.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)


BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"prompt": "hi"}, 400, "model"),
    ({"model": MODEL, "prompt": "hi", "lamda": 1.0}, 400, "lamda"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "top_k": -2}, 400, "top_k"),
    ({"model": MODEL, "prompt": "hi", "stop": ""}, 400, None),
    ({"model": MODEL, "prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"x1": 1.0}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"100000": 1}}, 400, "logit_bias"),  # past the vocabulary
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"9" * 5000: 1}}, 400, "logit_bias"),  # int() would refuse it
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"1": 1, "01": -1}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "hi", "repetition_penalty": 1e-39}, 400, "repetition_penalty"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {str(t): 1 for t in range(1025)}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "hi", "min_tokens": 20, "max_tokens": 5}, 400, "min_tokens"),
    ({"model": MODEL, "prompt": "hi", "min_tokens": -1}, 400, "min_tokens"),
    ({"model": MODEL, "prompt": [5] * 600}, 400, "prompt"),  # longer than the 512-token context
    ({"model": MODEL, "prompt": [100000]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 100000}, 400, "prompt"),
    ({"model": "other", "prompt": "hi"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_inputs_get_openai_errors(srv: Running, body: Any, status: int, param: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{srv.url}/v1/completions", content=content,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_min_tokens_beyond_the_context_names_the_room(srv: Running) -> None:
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": [5] * 500, "min_tokens": 20,
                                                      "max_tokens": None})
    assert r.status_code == 400 and "at most 12 can be generated" in r.json()["error"]["message"]


def test_bad_chat_and_the_server_keeps_serving(srv: Running) -> None:
    client = srv.client()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
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


def test_32_concurrent_streams_all_finish(srv: Running, oracle: LLM) -> None:
    prompts = [f"{i} + {i % 7} =" for i in range(32)]
    want = oracle.generate(prompts, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)

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
                 "rast_num_requests_waiting", "rast_step_seconds", "rast_spec_draft_tokens", "rast_spec_accepted_tokens"):
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


def test_api_key_and_capacity(triple: tuple[Path, Path, Path]) -> None:
    server = OpenAIServer(server_engine(triple, max_num_seqs=1), model_name=MODEL, api_key="sekret",
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


def test_engine_failure_is_reported_not_hidden(triple: tuple[Path, Path, Path]) -> None:
    engine = server_engine(triple, max_num_seqs=4)
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
        r2 = httpx.post(f"{running.url}/v1/completions", json={"model": MODEL, "prompt": "the"})
        assert r2.status_code == 503 and r2.json()["error"]["code"] == "engine_dead"
        assert metrics(running.url)["rast_engine_healthy"] == 0
    finally:
        running.close()
