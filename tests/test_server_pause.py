"""vLLM's /pause, /resume and /is_paused (engine/server/pause_control.py) around /v1/load_weights while
requests are in flight, and its /sleep, /wake_up and /is_sleeping. Oracle: the offline engine, on the old or
the new checkpoint (test_pausing.py checks the kept request's tokens against HF transformers)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from rast_engine import LLM, SamplingParams
from server_util import MODEL, PROMPTS, Running
from test_server_weights import _server
from test_weight_updates import another_rl

LONG = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 60, "ignore_eos": True, "temperature": 0}


def offline(triple: tuple, rl: str | None = None, max_tokens: int = 60) -> list[str]:
    large, old, base = map(str, triple)
    llm = LLM(large, rl or old, base, lam=1.0, device="cpu", dtype="float32", kv_cache_blocks=256)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].text for o in llm.generate(PROMPTS[:2], params, use_tqdm=False)]


class Stream:
    """A streamed completion read on its own thread: its text and finish reason once it ends."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        self.text, self.finish, self.chunks = "", None, 0
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url, body), daemon=True)
        self._thread.start()
        assert self.started.wait(60)

    def _read(self, url: str, body: dict[str, Any]) -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as s:
            for line in s.iter_lines():
                if not line.startswith("data: {"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                self.text += choice["text"]
                self.finish = choice["finish_reason"] or self.finish
                self.chunks += 1
                self.started.set()

    def join(self) -> "Stream":
        self._thread.join(120)
        assert not self._thread.is_alive()
        return self


def later(url: str) -> tuple[threading.Thread, list[httpx.Response]]:
    """LONG sent on its own thread, which waits while the server is paused or asleep; its response."""
    got: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: got.append(httpx.post(f"{url}/v1/completions", json=LONG, timeout=60)))
    sender.start()
    return sender, got


@pytest.fixture
def slow(server_triple: tuple, monkeypatch: pytest.MonkeyPatch) -> Iterator[Running]:
    """A server with the routes on whose steps take 20 ms or more: a request stays in flight."""
    monkeypatch.setenv("RAST_ALLOW_RUNTIME_WEIGHT_UPDATING", "1")
    running = _server(server_triple, step_seconds=0.02)
    yield running
    running.close()


def test_the_routes_are_off_unless_turned_on(server_triple: tuple) -> None:
    running = _server(server_triple)
    try:
        for method, route in (("POST", "/pause"), ("POST", "/resume"), ("GET", "/is_paused"), ("POST", "/sleep"),
                              ("POST", "/wake_up"), ("GET", "/is_sleeping")):
            assert httpx.request(method, f"{running.url}{route}").status_code == 404
    finally:
        running.close()


def test_abort_ends_the_streams_and_holds_new_requests_until_resume(server_triple: tuple, slow: Running) -> None:
    want = offline(server_triple)
    url = slow.url
    assert httpx.get(f"{url}/is_paused").json() == {"is_paused": False}
    stream = Stream(url, LONG)
    r = httpx.post(f"{url}/pause", timeout=60)
    assert r.status_code == 200 and r.json() == {"status": "paused"}
    stream.join()
    assert stream.finish == "abort" and want[1].startswith(stream.text) and stream.text != want[1]
    assert httpx.get(f"{url}/is_paused").json() == {"is_paused": True}
    late, held = later(url)
    time.sleep(0.5)
    assert not held and not slow.server.engine.engine.has_unfinished_requests()
    assert httpx.post(f"{url}/resume", timeout=60).json() == {"status": "resumed"}
    late.join(60)
    assert held[0].json()["choices"][0]["text"] == want[1]
    assert httpx.post(f"{url}/pause", params={"mode": "drain"}, timeout=60).status_code == 400
    assert httpx.post(f"{url}/pause", params={"clear_cache": "maybe"}, timeout=60).status_code == 400


def test_wait_answers_once_the_streams_finish(server_triple: tuple, slow: Running) -> None:
    want = offline(server_triple)
    stream = Stream(slow.url, LONG)
    r = httpx.post(f"{slow.url}/pause", params={"mode": "wait"}, timeout=60)
    assert r.status_code == 200 and stream.finish == "length" and stream.text == want[1]
    stream.join()


def test_a_resume_during_wait_answers_that_pause_409(slow: Running) -> None:
    stream = Stream(slow.url, LONG)
    answers: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: answers.append(
        httpx.post(f"{slow.url}/pause", params={"wait_for_inflight_requests": "true"}, timeout=60)))
    waiting.start()
    time.sleep(0.3)
    assert httpx.post(f"{slow.url}/resume", timeout=60).status_code == 200
    waiting.join(60)
    assert answers[0].status_code == 409 and stream.join().finish == "length"


def test_a_load_under_keep_goes_on_after_resume(server_triple: tuple, tmp_path: Path, slow: Running) -> None:
    """The kept stream's text begins as the old R's and ends on the new one's weights; a held request
    whose client left is dropped; a request after the load decodes as the offline engine on the new R."""
    rl2 = str(another_rl(server_triple, "qwen2", tmp_path))
    old, new = offline(server_triple), offline(server_triple, rl2)
    url = slow.url
    stream = Stream(url, LONG)
    assert httpx.post(f"{url}/v1/load_weights", json={"path": rl2}, timeout=60).status_code == 409
    assert httpx.post(f"{url}/pause", params={"mode": "keep"}, timeout=60).status_code == 200
    before = stream.text
    with pytest.raises(httpx.ReadTimeout):  # held while paused; the client leaves
        httpx.post(f"{url}/v1/completions", json=LONG, timeout=0.5)
    pausing, deadline = slow.server.engine.pausing, time.monotonic() + 30
    while pausing.held:  # dropped once the server sees the disconnect
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = httpx.post(f"{url}/v1/load_weights", json={"path": rl2}, timeout=60)
    assert r.status_code == 200 and stream.text == before and stream.finish is None
    assert httpx.post(f"{url}/resume", timeout=60).status_code == 200
    stream.join()
    assert stream.finish == "length" and old[1].startswith(before) and stream.text.startswith(before)
    assert stream.text not in (old[1], new[1])
    after = httpx.post(f"{url}/v1/completions", json=LONG, timeout=60).json()["choices"][0]["text"]
    assert after == new[1]
    assert not slow.server.engine.engine.has_unfinished_requests()


def test_sleep_refuses_while_requests_run_and_holds_later_ones_until_awake(server_triple: tuple, slow: Running) -> None:
    want = offline(server_triple)
    url = slow.url
    stream = Stream(url, LONG)
    busy = httpx.post(f"{url}/sleep", timeout=60)
    assert busy.status_code == 409 and "in flight" in busy.text
    stream.join()
    assert httpx.post(f"{url}/sleep", params={"level": "3"}, timeout=60).status_code == 400
    assert httpx.post(f"{url}/sleep", params={"level": "1"}, timeout=60).status_code == 200
    assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": True}
    sender, late = later(url)
    assert httpx.post(f"{url}/wake_up", params={"tags": "weight"}, timeout=60).status_code == 400
    assert httpx.post(f"{url}/wake_up", params={"tags": "weights"}, timeout=60).status_code == 200
    time.sleep(0.5)
    assert not late and httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": True}
    assert httpx.post(f"{url}/wake_up", params={"tags": "kv_cache"}, timeout=60).status_code == 200
    sender.join(60)
    assert late[0].json()["choices"][0]["text"] == want[1]
    assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": False}
