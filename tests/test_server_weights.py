"""The routes that change a running server's models (engine/server/weight_routes.py): /v1/load_weights
(another checkpoint of R, M staying loaded) and vLLM's dev-mode /reset_prefix_cache, each present only
when the environment turns it on. Oracle: the offline engine built on the new checkpoint."""
from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from rast_engine import LLM, SamplingParams
from rast_engine.server.app import OpenAIServer
from server_util import MODEL, PROMPTS, Running, server_engine
from test_weight_updates import another_rl


def _server(triple: tuple, step_seconds: float = 0.0) -> Running:
    """A server on the triple whose engine steps take at least ``step_seconds`` (a request stays in flight)."""
    engine = server_engine(triple)
    step = engine.step
    engine.step = lambda: (time.sleep(step_seconds), step())[1]
    return Running(OpenAIServer(engine, model_name=MODEL))


def test_the_routes_are_off_unless_turned_on(server_triple: tuple) -> None:
    running = _server(server_triple)
    try:
        assert httpx.post(f"{running.url}/v1/load_weights", json={"path": "x"}).status_code == 404
        assert httpx.post(f"{running.url}/reset_prefix_cache").status_code == 404
    finally:
        running.close()


def test_a_new_rl_checkpoint_serves_as_a_server_started_on_it(server_triple: tuple, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused (409) while a streamed request is in flight and changing nothing; once the server is idle
    the checkpoint loads, and completions equal the offline engine built on it. A bad path is a 400."""
    monkeypatch.setenv("RAST_ALLOW_RUNTIME_WEIGHT_UPDATING", "1")
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    large, _, base = map(str, server_triple)
    rl2 = str(another_rl(server_triple, "qwen2", tmp_path))
    greedy = SamplingParams(temperature=0, max_tokens=8)
    want = LLM(large, rl2, base, lam=1.0, device="cpu", dtype="float32", kv_cache_blocks=256).generate(
        PROMPTS[:2], greedy, use_tqdm=False)
    running = _server(server_triple, step_seconds=0.01)
    url, client = running.url, running.client()
    try:
        before = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()  # held: a dropped iterator closes the stream (the request is aborted)
            next(lines)  # the request is in the engine, for 200 steps of 10 ms or more
            for route, payload in (("/v1/load_weights", {"path": rl2}), ("/reset_prefix_cache", None)):
                busy = httpx.post(f"{url}{route}", json=payload, timeout=60)
                assert busy.status_code == 409 and "in flight" in busy.text, busy.text
        assert client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8,
                                         temperature=0).choices[0].text == before.choices[0].text
        for payload, status in (({"path": str(tmp_path / "none")}, 400), ({"path": rl2, "role": "nope"}, 400)):
            assert httpx.post(f"{url}/v1/load_weights", json=payload, timeout=60).status_code == status
        deadline = time.monotonic() + 30
        while (r := httpx.post(f"{url}/v1/load_weights", json={"path": rl2}, timeout=60)).status_code == 409:
            assert time.monotonic() < deadline  # the closed stream's request is aborted between two steps
            time.sleep(0.05)
        engine = running.server.engine.engine
        assert r.status_code == 200 and json.loads(r.text)["tensors"] == len(engine.model_set.models[1].weight_map())
        got = [client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0).choices[0].text
               for p in PROMPTS[:2]]
        assert got == [o.outputs[0].text for o in want] and got[0] != before.choices[0].text
        assert engine.scheduler.bm.cached
        assert httpx.post(f"{url}/reset_prefix_cache", timeout=60).status_code == 200
        assert not engine.scheduler.bm.cached
    finally:
        running.close()
