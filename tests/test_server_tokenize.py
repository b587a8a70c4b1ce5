"""/tokenize and /detokenize (vLLM's): the server's tokenizer and chat template, checked against the
tokenizer used directly and against the prompt_tokens the completion endpoints report for the same
input."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from server_util import MODEL, PROMPTS, Running

MESSAGES = [{"role": "system", "content": "we add"}, {"role": "user", "content": "what is 3 + 5?"}]


@pytest.fixture(scope="module")
def tok(server_triple: tuple[Path, Path, Path]):  # noqa: ANN201
    return AutoTokenizer.from_pretrained(str(server_triple[0]))


def post(srv: Running, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{srv.url}{path}", json={"model": MODEL, **body}, timeout=60)


def test_tokenize_a_prompt_and_messages(srv: Running, tok) -> None:  # noqa: ANN001
    r = post(srv, "/tokenize", {"prompt": PROMPTS[0], "return_token_strs": True}).json()
    ids = tok.encode(PROMPTS[0])
    assert r == {"count": len(ids), "max_model_len": srv.server.engine.max_model_len, "tokens": ids,
                 "token_strs": tok.convert_ids_to_tokens(ids)}
    usage = srv.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=1).usage
    assert usage.prompt_tokens == r["count"]
    r = post(srv, "/tokenize", {"messages": MESSAGES}).json()
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert r["tokens"] == tok.encode(text, add_special_tokens=False) and r["token_strs"] is None
    usage = srv.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1).usage
    assert usage.prompt_tokens == r["count"]
    bare = post(srv, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert bare["count"] < r["count"]


def test_detokenize_round_trips(srv: Running, tok) -> None:  # noqa: ANN001
    ids = post(srv, "/tokenize", {"prompt": PROMPTS[3], "add_special_tokens": False}).json()["tokens"]
    assert post(srv, "/detokenize", {"tokens": ids}).json() == {"prompt": tok.decode(ids)} == {"prompt": PROMPTS[3]}


@pytest.mark.parametrize("path,body,status,param", [
    ("/tokenize", {"prompt": "hi", "messages": MESSAGES}, 400, "prompt"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [True]}, 400, "tokens"),
    ("/tokenize", {"prompt": "hi", "lamda": 1}, 400, "lamda"),
    ("/detokenize", {"tokens": [1, 100000]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
])
def test_bad_inputs(srv: Running, path: str, body: dict, status: int, param: str | None) -> None:
    r = post(srv, path, body)
    assert (r.status_code, r.json()["error"]["param"]) == (status, param), r.text


def test_a_remote_tokenizer_works_without_a_model_name(srv: Running, tok) -> None:  # noqa: ANN001
    """What lm-evaluation-harness' remote tokenizer sends: /tokenizer_info, then /tokenize and /detokenize
    without a model field."""
    info = httpx.get(f"{srv.url}/tokenizer_info").json()
    assert (info["eos_token"], info["bos_token"], info["chat_template"]) == (tok.eos_token, tok.bos_token,
                                                                           tok.chat_template)
    assert info["model_max_length"] == srv.server.engine.max_model_len
    ids = httpx.post(f"{srv.url}/tokenize", json={"prompt": PROMPTS[1], "add_special_tokens": False}).json()["tokens"]
    assert ids == tok.encode(PROMPTS[1], add_special_tokens=False)
    assert httpx.post(f"{srv.url}/detokenize", json={"tokens": ids}).json()["prompt"] == PROMPTS[1]


def test_another_model_is_a_404(srv: Running) -> None:
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [5]})):
        r = httpx.post(f"{srv.url}{path}", json={"model": "other", **body})
        assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")


def test_unadmitted_jobs_beyond_capacity_are_refused() -> None:
    """Chat rendering, /tokenize and /detokenize run on the tokenizer thread before anything counts them
    in flight, so they are bounded on their own: with capacity 3 (max_num_seqs 2 + max_waiting 1) and
    three jobs held on the thread, a fourth is a 429; an admitted submission's encode still runs, and
    once the held jobs finish the count is back to zero."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from rast_engine.server.async_engine import AsyncEngine
    from rast_engine.server.protocol import APIError

    engine = SimpleNamespace(tokenizer=None, max_model_len=64, config=SimpleNamespace(max_num_seqs=2),
                             stats=lambda: None, has_unfinished_requests=lambda: False)
    gate = threading.Event()

    async def main() -> None:
        served = AsyncEngine(engine, max_waiting=1)
        served.start()
        try:
            held = [asyncio.ensure_future(served.in_tokenizer_thread(gate.wait, 30)) for _ in range(3)]
            await asyncio.sleep(0)  # each held job has counted itself
            assert served.unadmitted_jobs == 3
            with pytest.raises(APIError) as refused:
                await served.in_tokenizer_thread(len, "abc")
            assert (refused.value.status, refused.value.code) == (429, "over_capacity")
            admitted = asyncio.ensure_future(served.in_tokenizer_thread(len, "abc", admitted=True))
            gate.set()
            assert await asyncio.gather(*held) == [True] * 3 and await admitted == 3
            assert served.unadmitted_jobs == 0 and await served.in_tokenizer_thread(len, "ab") == 2
        finally:
            gate.set()
            served.stop()

    asyncio.run(main())


def test_continue_final_message_continues_the_assistants_text(srv: Running, tok) -> None:  # noqa: ANN001
    """vLLM's continue_final_message: the output continues the last message (HF's rendering the oracle, and
    /v1/completions on its ids the output's); with add_generation_prompt it is a 400. /ping answers as
    /health does (vLLM's probe)."""
    messages = MESSAGES + [{"role": "assistant", "content": "3 + 5 ="}]
    text = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    ids = tok.encode(text, add_special_tokens=False)
    flags = {"add_generation_prompt": False, "continue_final_message": True}
    assert post(srv, "/tokenize", {"messages": messages, **flags}).json()["tokens"] == ids
    want = post(srv, "/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0}).json()
    got = post(srv, "/v1/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0, **flags})
    assert got.json()["choices"][0]["message"]["content"] == want["choices"][0]["text"]
    assert got.json()["usage"]["prompt_tokens"] == len(ids) and text.endswith("3 + 5 =")
    for path in ("/tokenize", "/v1/chat/completions"):
        r = post(srv, path, {"messages": messages, "continue_final_message": True})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "continue_final_message"), path
    assert httpx.get(f"{srv.url}/ping").status_code == httpx.post(f"{srv.url}/ping").status_code == 200
