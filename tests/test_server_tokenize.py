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
