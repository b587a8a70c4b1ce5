"""The server's logits_processors field (engine/server/processor_names.py): vLLM V0's processors named by
qualified name or built by a factory per request, only where rast serve --logits-processor-pattern allows.

Oracle: LLM.generate with the same processors as Python objects (whose results test_logits_processors.py
holds to HF's Eq. 3 logits); the refusals name the field."""
from __future__ import annotations

import math

import httpx
import pytest
import torch

from rast_engine import LLM, SamplingParams
from server_util import MODEL, Running, server_engine

HERE = __name__  # the processors below are loaded by this module's name


def no_repeat(output_ids: list[int], z: torch.Tensor) -> torch.Tensor:
    z = z.clone()
    if output_ids:
        z[output_ids[-1]] = -math.inf
    return z


def one_arg(z: torch.Tensor) -> torch.Tensor:
    return z


class Boost:
    """A factory's processor: raises one token."""

    def __init__(self, token: int, by: float) -> None:
        self.token, self.by = token, by

    def __call__(self, output_ids: list[int], z: torch.Tensor) -> torch.Tensor:
        z = z.clone()
        z[self.token] += self.by
        return z


def broken(*args: object) -> None:
    raise RuntimeError("no such mode")


def fails_later(output_ids: list[int], z: torch.Tensor) -> torch.Tensor:
    if len(output_ids) == 2:
        raise KeyError("the third token")
    return z


@pytest.fixture(scope="module")
def psrv(server_triple: tuple):  # noqa: ANN201
    from rast_engine.server.app import OpenAIServer

    allowed = rf"{HERE}\.(no_repeat|one_arg|Boost|broken|missing|fails_later)"
    running = Running(OpenAIServer(server_engine(server_triple), model_name=MODEL, logits_processor_pattern=allowed))
    yield running
    running.close()


SPECS = [f"{HERE}.no_repeat", {"qualname": f"{HERE}.Boost", "args": [7], "kwargs": {"by": 2.5}}]


def test_named_processors_are_the_offline_engines(psrv: Running, server_oracle: LLM) -> None:
    prompts = ["the cat sat on", "3 + 5 ="]
    r = httpx.post(f"{psrv.url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompts, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True, "logits_processors": SPECS})
    assert r.status_code == 200, r.text
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                            logits_processors=[no_repeat, Boost(7, by=2.5)])
    want = server_oracle.generate(prompts, params, use_tqdm=False)
    assert [c["token_ids"] for c in r.json()["choices"]] == [o.outputs[0].token_ids for o in want]
    plain = server_oracle.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                                   use_tqdm=False)
    assert [o.outputs[0].token_ids for o in plain] != [o.outputs[0].token_ids for o in want]  # they did act

    messages = [{"role": "user", "content": "the cat"}]
    chat = httpx.post(f"{psrv.url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": messages, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True, "logits_processors": SPECS})
    assert chat.status_code == 200, chat.text
    (want_chat,) = server_oracle.chat(messages, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True,
                                                               logits_processors=[no_repeat, Boost(7, by=2.5)]),
                                      use_tqdm=False)
    assert chat.json()["choices"][0]["token_ids"] == want_chat.outputs[0].token_ids


@pytest.mark.parametrize("specs, says", [
    ([f"{HERE}.Boost2"], "is not allowed"), (["os.system"], "is not allowed"),
    ([f"{HERE}.missing"], "cannot be loaded"), ([f"{HERE}.one_arg"], "1 required positional"),
    ([{"qualname": f"{HERE}.broken"}], "construction raised RuntimeError"),
    ([{"qualname": f"{HERE}.Boost", "args": [1]}], "construction raised TypeError"),
    ([{"qualname": f"{HERE}.Boost", "extra": 1}], "logits_processors.0"), ([], "at least 1")])
def test_what_a_request_may_not_load_is_a_400(psrv: Running, specs: list, says: str) -> None:
    r = httpx.post(f"{psrv.url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "x", "max_tokens": 2, "logits_processors": specs})
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] is None or r.json()["error"]["param"].startswith("logits_processors")


def test_without_the_pattern_the_field_is_refused(srv: Running) -> None:
    r = httpx.post(f"{srv.url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "x", "max_tokens": 2, "logits_processors": [f"{HERE}.no_repeat"]})
    assert r.status_code == 400 and "--logits-processor-pattern" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "logits_processors"


def test_the_responses_api_takes_them_as_chat_does(psrv: Running) -> None:
    forced = [f"{HERE}.no_repeat", {"qualname": f"{HERE}.Boost", "args": [7], "kwargs": {"by": 50.0}}]
    body = {"model": MODEL, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logits_processors": forced}
    chat = httpx.post(f"{psrv.url}/v1/chat/completions", timeout=60,
                      json={**body, "messages": [{"role": "user", "content": "the cat"}]}).json()
    plain = httpx.post(f"{psrv.url}/v1/chat/completions", timeout=60, json={
        **body, "logits_processors": None, "messages": [{"role": "user", "content": "the cat"}]}).json()
    assert plain["choices"][0]["message"]["content"] != chat["choices"][0]["message"]["content"]
    body["max_output_tokens"] = body.pop("max_tokens")
    got = httpx.post(f"{psrv.url}/v1/responses", timeout=60, json={**body, "input": "the cat"}).json()
    assert got["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"], got


def test_a_processor_that_fails_mid_request_fails_that_request_alone(psrv: Running) -> None:
    body = {"model": MODEL, "prompt": "the cat sat on", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{psrv.url}/v1/completions", timeout=60,
                   json={**body, "logits_processors": [f"{HERE}.fails_later"]})
    assert r.status_code == 500 and r.json()["error"]["code"] == "logits_processor_error", r.text
    assert "KeyError" in r.json()["error"]["message"]
    assert httpx.get(f"{psrv.url}/health").status_code == 200  # the engine serves on
    again = httpx.post(f"{psrv.url}/v1/completions", timeout=60, json=body)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 6
