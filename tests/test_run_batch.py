"""`rast run-batch` (engine/server/run_batch.py): OpenAI Batch API files answered offline.

Oracles: a running `rast serve` over the same triple answers each line's body (seeded, so the draws do
not depend on what else is batched), and its answer must be the batch line's body; error lines carry
the server's own error for a body it refuses, and the batch's for a line it cannot send. The engine's
stats say nothing was left behind."""
from __future__ import annotations

import asyncio
import io
import json
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from rast_engine import LLMEngine
from rast_engine.cli import main
from rast_engine.server.app import OpenAIServer
from rast_engine.server.run_batch import run_batch
from server_util import MODEL, Running, server_engine

VOLATILE = ("id", "created", "created_at")


def _line(custom_id: str, url: str, body: dict[str, Any]) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": MODEL, **body}})


def _requests() -> list[str]:
    lines = []
    for i in range(6):
        lines.append(_line(f"c{i}", "/v1/completions", {"prompt": ["the cat sat on", "3 + 5 ="][i % 2],
                                                         "max_tokens": 4 + i, "seed": i, "temperature": 1.0}))
        lines.append(_line(f"m{i}", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 5, "seed": 10 + i, "n": 1 + i % 2}))
    for i in range(2):
        lines.append(_line(f"r{i}", "/v1/responses", {"input": f"hello {i}", "max_output_tokens": 4, "seed": 20 + i,
                                                       "temperature": 1.0, "store": False}))
    lines.append(_line("list", "/v1/completions", {"prompt": ["hello world! this", "what is"], "max_tokens": 3,
                                                   "seed": 7, "logprobs": 2}))
    return lines


def _batch(engine: LLMEngine, lines: list[str | bytes], **kw: Any) -> list[dict[str, Any]]:
    """A batch through a fresh server (one batch runs the server's lifespan, which stops its engine thread)
    that holds 3 prompts in flight: two slots and one waiting place."""
    out: list[str] = []
    server = OpenAIServer(engine, model_name=MODEL, max_waiting=1)
    summary = asyncio.run(run_batch(server, lines, out.append, **kw))
    assert summary.lines == len(out) == summary.succeeded + summary.failed
    return [json.loads(o) for o in out]


def _stable(body: dict[str, Any]) -> dict[str, Any]:
    """The body without what differs from one answer to the next: ids, times (a response's items' ids too)."""
    stable = {k: v for k, v in body.items() if k not in VOLATILE}
    if "output" in stable:
        stable["output"] = [{k: v for k, v in item.items() if k != "id"} for item in stable["output"]]
    return stable


def _same(a: Any, b: Any) -> bool:
    """Equal, log-probabilities within 1e-4: the same request batched with others draws the same tokens,
    but its float32 logits may differ in the last bits."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-4
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def small_engine(server_triple: tuple) -> LLMEngine:
    """Two slots: a batch of 15 lines (19 prompts) must queue behind its gate."""
    return server_engine(server_triple, max_num_seqs=2)


def test_each_line_is_what_the_server_answers(srv: Running, small_engine: LLMEngine) -> None:
    lines = _requests()
    got = _batch(small_engine, lines)
    assert [g["custom_id"] for g in got] == [json.loads(line)["custom_id"] for line in lines]
    for line, result in zip(lines, got):
        item = json.loads(line)
        live = httpx.post(f"{srv.url}{item['url']}", json=item["body"], timeout=60)
        assert live.status_code == 200 and result["response"]["status_code"] == 200 and result["error"] is None
        assert _same(_stable(result["response"]["body"]), _stable(live.json())), item["custom_id"]
    assert len({g["id"] for g in got}) == len({g["response"]["request_id"] for g in got}) == len(got)
    stats = small_engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_blocks_used == 0


def test_a_bad_line_fails_alone(srv: Running, small_engine: LLMEngine) -> None:
    good = _line("ok", "/v1/completions", {"prompt": "the cat sat on", "max_tokens": 3, "seed": 1})
    bad_body = {"model": MODEL, "prompt": "hi", "max_tokens": -1}
    lines: list[str | bytes] = [
        "not json", "[1, 2]", json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}), good,
        json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {}}),
        _line("emb", "/v1/embeddings", {"input": "x"}), "   ",
        _line("stream", "/v1/completions", {"prompt": "hi", "stream": True}),
        _line("bg", "/v1/responses", {"input": "hi", "background": True}),
        json.dumps({"custom_id": "neg", "method": "POST", "url": "/v1/completions", "body": bad_body}),
        json.dumps({"custom_id": "who", "url": "/v1/chat/completions",
                    "body": {"model": "other", "messages": [{"role": "user", "content": "hi"}]}}),
        b'{"custom_id": "bytes", "body": "\xff"}',
        _line("many", "/v1/completions", {"prompt": ["a"] * 4, "max_tokens": 1}),  # more prompts than the server holds
        good.replace('"ok"', '"ok2"'),
    ]
    got = _batch(small_engine, lines)
    assert [g["custom_id"] for g in got] == [None, None, None, "ok", "get", "emb", "stream", "bg", "neg", "who", None,
                                             "many", "ok2"]
    status = [g["response"]["status_code"] for g in got]
    assert status == [400] * 3 + [200] + [400] * 5 + [404, 400, 400, 200]
    for g in got:
        assert (g["error"] is None) == (g["response"]["status_code"] == 200)
        if g["error"] is not None:
            assert g["error"] == g["response"]["body"]["error"] and g["error"]["message"]
    live = httpx.post(f"{srv.url}/v1/completions", json=bad_body, timeout=60).json()
    assert got[8]["error"]["message"] == live["error"]["message"]
    assert "stream" in got[6]["error"]["message"] and "/v1/embeddings" in got[5]["error"]["message"]
    assert "background" in got[7]["error"]["message"]
    assert "at most 3 in flight" in got[11]["error"]["message"]
    assert _same(got[3]["response"]["body"]["choices"], got[12]["response"]["body"]["choices"])


def test_a_small_window_keeps_order_and_finishes(small_engine: LLMEngine) -> None:
    lines = _requests()
    whole = _batch(small_engine, lines)
    narrow = _batch(small_engine, lines, window=1)  # one line at a time
    assert _same([_stable(g["response"]["body"]) for g in narrow], [_stable(g["response"]["body"]) for g in whole])


def test_the_command_writes_a_line_for_each_request(server_triple: tuple, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    large, rl, base = server_triple
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = _requests()[:4] + ["{oops"]
    src.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    flags = [str(large), "--small-rl", str(rl), "--small-base", str(base), "--device", "cpu", "--dtype", "float32",
             "--kv-cache-blocks", "64", "--served-model-name", MODEL, "--log-level", "warning"]
    assert main(["run-batch", "-i", str(src), "-o", str(dst), *flags]) == 0
    got = [json.loads(x) for x in dst.read_text(encoding="utf-8").splitlines()]
    assert [g["custom_id"] for g in got] == ["c0", "m0", "c1", "m1", None]
    assert [g["response"]["status_code"] for g in got] == [200] * 4 + [400]
    assert "5 requests, 4 answered, 1 failed" in capsys.readouterr().err
    assert main(["run-batch", "-i", str(src), "-o", str(src), *flags]) == 2
    assert main(["run-batch", "-i", str(tmp_path / "missing.jsonl"), "-o", str(dst), *flags]) == 2
    assert "No such file" in capsys.readouterr().err
    stdin = io.TextIOWrapper(io.BytesIO(src.read_bytes()), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdin", stdin)
        assert main(["run-batch", "-i", "-", "-o", "-", *flags]) == 0
    piped = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert _same([_stable(g["response"]["body"]) for g in piped], [_stable(g["response"]["body"]) for g in got])


def test_a_dead_engine_still_answers_every_line(server_triple: tuple) -> None:
    engine = server_engine(server_triple, max_num_seqs=2)
    step, calls = engine.step, [0]

    def failing() -> Any:
        calls[0] += 1
        if calls[0] > 3:
            raise RuntimeError("device lost")
        return step()
    engine.step = failing  # type: ignore[method-assign]
    out: list[str] = []
    lines = _requests()
    summary = asyncio.run(run_batch(OpenAIServer(engine, model_name=MODEL, max_waiting=1), lines, out.append))
    got = [json.loads(o) for o in out]
    assert [g["custom_id"] for g in got] == [json.loads(line)["custom_id"] for line in lines]
    assert "device lost" in repr(summary.engine_error) and summary.failed == len(lines) - summary.succeeded > 0
    assert {g["response"]["status_code"] for g in got} <= {200, 500, 503}


def test_odd_lines_answer_as_the_server_does(srv: Running, small_engine: LLMEngine) -> None:
    """Nesting deeper than Python's recursion limit is that line's 400, never the batch's crash; a stream
    flag the server reads as false ("false", 0) is no stream."""
    deep = '{"custom_id": "deep", "url": "/v1/completions", "body": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}"
    quiet = {"prompt": "the cat sat on", "max_tokens": 3, "seed": 2}
    lines = [deep, _line("off", "/v1/completions", {**quiet, "stream": "false"}),
             _line("zero", "/v1/completions", {**quiet, "stream": 0}),
             _line("on", "/v1/completions", {**quiet, "stream": "on"})]
    got = _batch(small_engine, lines)
    assert [g["response"]["status_code"] for g in got] == [400, 200, 200, 400]
    assert "nested too deeply" in got[0]["error"]["message"]
    live = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, **quiet, "stream": "false"}, timeout=60)
    assert _same(_stable(got[1]["response"]["body"]), _stable(live.json()))


def test_a_line_is_answered_before_the_next_arrives(small_engine: LLMEngine) -> None:
    """Input from a pipe whose writer waits for an answer before it writes on (a co-process): reading the
    next line must not hold up the requests already read."""
    answered, out, in_time = threading.Event(), [], []

    def lines() -> Iterator[str]:
        yield _line("first", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "seed": 1})
        in_time.append(answered.wait(timeout=20))  # a stalled loop answers only after this gives up
        yield _line("second", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "seed": 1})

    def write(line: str) -> None:
        out.append(line)
        answered.set()
    asyncio.run(run_batch(OpenAIServer(small_engine, model_name=MODEL, max_waiting=1), lines(), write))
    assert in_time == [True] and [json.loads(o)["custom_id"] for o in out] == ["first", "second"]
    assert json.loads(out[0])["response"]["status_code"] == 200


def test_the_output_may_not_be_the_input_under_another_name(server_triple: tuple, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in.jsonl"
    text = _requests()[0] + "\n"
    src.write_text(text, encoding="utf-8")
    (tmp_path / "link.jsonl").symlink_to(src)
    monkeypatch.chdir(tmp_path)
    for output in ("./in.jsonl", str(src.resolve()), "link.jsonl"):
        assert main(["run-batch", "-i", "in.jsonl", "-o", output, str(server_triple[0])]) == 2
    assert src.read_text(encoding="utf-8") == text
