"""One bad request never takes others down: values the kernels cannot represent are refused up front,
a request whose draw finds no admissible token is named (the step undone) so the caller can drop just
it, and the server answers such failures per request while it keeps serving. The oracle for the
requests that go on is the same request run alone."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import torch
from factories import make_triple

import rast_kernels
from rast_engine import LLM, EngineConfig, LLMEngine, SamplingParams
from rast_engine.errors import NoAdmissibleToken, RastError
from rast_engine.sampling_params import sample_seed
from rast_engine.server.app import OpenAIServer
from server_util import MODEL, Running, server_engine

POISON = 7  # requests seeded with it find no admissible token from their third draw on


def poisoned(real: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """rast_sample, except that draws of the POISON-seeded request's first sample return -1 (what the
    kernel returns when every combined logit is NaN or infinite) once it has two tokens."""
    bad = sample_seed(POISON, 0)

    def sample(*args: Any, seed: Any = 0, offset: Any = 0, **kw: Any) -> torch.Tensor:
        ids = real(*args, seed=seed, offset=offset, **kw)
        if isinstance(seed, torch.Tensor):
            hit = (seed == bad) & (torch.as_tensor(offset, device=ids.device) >= 2)
            ids = torch.where(hit, torch.full_like(ids, -1), ids)
        return ids

    return sample


def _engine(triple: tuple, **kw: Any) -> LLMEngine:
    large, rl, base = map(str, triple)
    return LLMEngine(EngineConfig(large, rl, base, lam=0.8, device="cpu", dtype="float32", kv_cache_blocks=64,
                                  max_model_len=64, **kw))


def _finish(engine: LLMEngine, done: dict[str, list[int]]) -> None:
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids


def test_values_the_kernels_cannot_hold_are_refused_or_mean_off() -> None:
    assert SamplingParams(top_k=2**31).top_k == 0 == SamplingParams(top_k=2**70).top_k  # k >= V: off
    for lam in (1e39, 1e7, [1.0, -2e6], float("inf")):
        with pytest.raises(RastError, match="lam"):
            SamplingParams(lam=lam)
    with pytest.raises(RastError, match="lam"):
        EngineConfig("m", "r", "b", lam=1e39)
    with pytest.raises(RastError, match="weight"):
        EngineConfig("m", experts=[("r", "b", -1e7)])
    SamplingParams(lam=[1e6, -1e6])


def test_engine_arguments_with_nothing_to_act_on_are_refused() -> None:
    """A λ without a small pair was dropped silently (a request's λ there is refused); experts that are
    not a list raised a bare TypeError."""
    with pytest.raises(RastError, match="lam=5.0 weighs the"):
        EngineConfig("m", lam=5.0)
    with pytest.raises(RastError, match="experts carry their own weights"):
        EngineConfig("m", experts=[("r", "b", 1.0)], lam=0.0)
    for experts in (5, 1.0, "r"):
        with pytest.raises(RastError, match="experts must be a list"):
            EngineConfig("m", experts=experts)
    assert EngineConfig("m", experts=[("r", "b", 0.5)]).pairs[0].weight == 0.5  # the default λ is no choice


def test_params_changed_after_construction_are_checked_and_copied(qwen2_triple: tuple) -> None:
    engine, prompt = _engine(qwen2_triple), [5, 6, 7, 8]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    params.n = 0
    with pytest.raises(RastError, match="n must be"):
        engine.add_request("a", prompt, params)
    assert not engine.groups and not engine.scheduler.waiting
    params.n = 1
    engine.add_request("a", prompt, params)
    params.max_tokens = 10**6  # the caller's object, not the request's any more
    done: dict[str, list[int]] = {}
    _finish(engine, done)
    assert len(done["a"]) == 3


@pytest.mark.parametrize("speculative", [0, 2])  # a speculative round's rows are sequences, not draws
def test_an_undrawable_request_is_named_and_the_others_go_on(qwen2_triple: tuple, monkeypatch: pytest.MonkeyPatch,
                                                             speculative: int) -> None:
    good = SamplingParams(temperature=1.0, seed=1, max_tokens=8, ignore_eos=True)
    bad = SamplingParams(temperature=1.0, seed=POISON, max_tokens=8, ignore_eos=True)
    want: dict[str, list[int]] = {}
    alone = _engine(qwen2_triple, speculative_tokens=speculative)
    alone.add_request("good", [5, 6, 7], good)
    _finish(alone, want)
    monkeypatch.setattr(rast_kernels, "rast_sample", poisoned(rast_kernels.rast_sample))
    engine, done = _engine(qwen2_triple, speculative_tokens=speculative), {}
    engine.add_request("good", [5, 6, 7], good)
    engine.add_request("bad", [9, 10, 11, 12], bad)
    with pytest.raises(NoAdmissibleToken) as failed:
        _finish(engine, done)
    assert failed.value.request_ids == ("bad",) and "'bad'" in str(failed.value)
    with pytest.raises(NoAdmissibleToken):  # the step was undone, so it fails again, naming it again
        engine.step()
    engine.abort_request("bad")
    _finish(engine, done)
    assert done == want
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("gone", ["aborted", "finished"])
def test_a_failed_draw_of_a_request_gone_since_its_launch_undoes_nothing(qwen2_triple: tuple,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        gone: str) -> None:
    """With async scheduling the batch after a request's last token may already be in flight when the
    request is aborted, or finishes on a stop string its text shows only then. That batch's draw for it
    is discarded, so finding no token there undoes nothing: the step goes on and the others' tokens
    equal a run without it."""
    good = SamplingParams(temperature=1.0, seed=1, max_tokens=8, ignore_eos=True)
    bad = SamplingParams(temperature=1.0, seed=POISON, max_tokens=8, ignore_eos=True)
    want: dict[str, list[int]] = {}
    alone = _engine(qwen2_triple, async_output=True)
    alone.add_request("good", [5, 6, 7], good)
    alone.add_request("bad", [9, 10, 11], bad)
    outs = {}
    while alone.has_unfinished_requests():
        outs.update({o.request_id: o.outputs[0] for o in alone.step() if o.finished})
    want["good"] = outs["good"].token_ids
    if gone == "finished":  # a stop string its second token's text shows (the third draw is poisoned)
        text = alone.tokenizer.decode(outs["bad"].token_ids[:2])
        stop = text[len(alone.tokenizer.decode(outs["bad"].token_ids[:1])):]
        assert stop.strip() and stop not in text[:len(text) - len(stop)], text
        bad = SamplingParams(temperature=1.0, seed=POISON, max_tokens=8, ignore_eos=True, stop=[stop])
    monkeypatch.setattr(rast_kernels, "rast_sample", poisoned(rast_kernels.rast_sample))
    engine, done = _engine(qwen2_triple, async_output=True), {}
    assert engine.async_scheduling
    engine.add_request("good", [5, 6, 7], good)
    engine.add_request("bad", [9, 10, 11], bad)
    for _ in range(2):  # the prefill's draw, then the first decode: the batch of bad's third draw is in flight
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    assert engine._in_flight is not None
    if gone == "aborted":
        engine.abort_request("bad")
    _finish(engine, done)
    assert done["good"] == want["good"] and ("bad" in done) == (gone == "finished")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_generate_admits_a_batch_whole_or_not_at_all(qwen2_triple: tuple) -> None:
    large, rl, base = map(str, qwen2_triple)
    llm = LLM(large, rl, base, device="cpu", dtype="float32", kv_cache_blocks=64, max_model_len=64)
    with pytest.raises(RastError, match="tokenizer cannot encode"):
        llm.generate(["the cat sat on", "hi \ud800"], SamplingParams(max_tokens=4))  # a lone surrogate
    assert not llm.llm_engine.groups and not llm.llm_engine.has_unfinished_requests()
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    as_tuple, as_list = llm.generate((5, 6, 7), greedy), llm.generate([5, 6, 7], greedy)
    assert len(as_tuple) == 1 and as_tuple[0].outputs[0].token_ids == as_list[0].outputs[0].token_ids


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    triple = make_triple(tmp_path_factory.mktemp("isolation-triple"))
    running = Running(OpenAIServer(server_engine(triple, max_num_seqs=4), model_name=MODEL, max_waiting=4))
    yield running, triple
    running.close()


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": MODEL, **body}, timeout=60)


def test_the_server_fails_bad_requests_alone_and_serves_on(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    running, triple = server
    url = running.url
    lone_surrogate = ('{"model": "%s", "prompt": "hi \\ud800", "max_tokens": 2}' % MODEL).encode()  # valid JSON
    r = httpx.post(f"{url}/v1/completions", content=lone_surrogate, timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "tokenizer cannot encode" in r.json()["error"]["message"]
    r = _post(url, {"prompt": [[5, 6]] * 9, "max_tokens": 2})  # capacity 8: can never fit
    assert r.status_code == 400 and "9 prompts" in r.json()["error"]["message"]
    r = _post(url, {"prompt": "the", "max_tokens": 2, "lam": 1e39})
    assert r.status_code == 400
    body = {"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 1.0, "seed": 1, "ignore_eos": True}
    want = _post(url, body).json()["choices"][0]["text"]
    monkeypatch.setattr(rast_kernels, "rast_sample", poisoned(rast_kernels.rast_sample))
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"model": MODEL, **body, "max_tokens": 40, "stream": True}) as stream:
        lines = stream.iter_lines()  # a stream in flight while the poisoned request fails
        assert next(lines).startswith("data: ")
        r = _post(url, {**body, "seed": POISON})
        assert r.status_code == 500 and r.json()["error"]["code"] == "no_admissible_token"
        rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)
    assert _post(url, body).json()["choices"][0]["text"] == want
    assert httpx.get(f"{url}/health").status_code == 200


def test_prompts_are_encoded_on_the_tokenizer_thread(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Encoding a prompt (a huge one takes seconds) and rendering a chat template happen on the tokenizer
    thread, never on the engine thread (every stream would stall) or the event loop (every route would):
    each call is recorded with its thread. A prompt too long for the context is still a 400."""
    import threading

    running, _ = server
    tok = running.server.engine.tokenizer
    threads: list[str] = []
    for name in ("encode", "apply_chat_template"):
        real = getattr(tok, name)
        monkeypatch.setattr(tok, name, lambda *a, _real=real, **kw: (
            threads.append(threading.current_thread().name), _real(*a, **kw))[1])
    assert _post(running.url, {"prompt": ["the cat", "sat on"], "max_tokens": 2}).status_code == 200
    r = _post(running.url, {"prompt": "the cat sat on the mat " * 2000, "max_tokens": 2})
    assert r.status_code == 400 and "more than 512 tokens" in r.json()["error"]["message"]  # from a prefix
    r = httpx.post(f"{running.url}/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200
    r = httpx.post(f"{running.url}/tokenize", json={"model": MODEL, "prompt": "the cat"}, timeout=60)
    assert r.status_code == 200
    assert len(threads) >= 5 and all(t.startswith("rast-tokenizer") for t in threads), threads


def test_a_text_prompt_to_an_engine_without_a_tokenizer_is_a_400(tmp_path: Path) -> None:
    import json

    large = make_triple(tmp_path / "t")[0]
    cfg = json.loads((large / "config.json").read_text())
    (tmp_path / "dummy").mkdir()
    (tmp_path / "dummy" / "config.json").write_text(json.dumps(cfg))
    d = str(tmp_path / "dummy")
    engine = LLMEngine(EngineConfig(d, load_format="dummy", device="cpu", dtype="float32", kv_cache_blocks=16,
                                    max_model_len=32))
    running = Running(OpenAIServer(engine, model_name=MODEL))
    try:
        r = _post(running.url, {"prompt": "the cat", "max_tokens": 2})
        assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
        assert _post(running.url, {"prompt": [5, 6], "max_tokens": 2}).status_code == 200
        r = _post(running.url, {"prompt": [5, 6], "max_tokens": 2, "echo": True})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "echo")
        r = _post(running.url, {"prompt": [5, 6], "max_tokens": 2, "logprobs": 2, "ignore_eos": True})
        tokens = r.json()["choices"][0]["logprobs"]["tokens"]
        assert r.status_code == 200 and len(tokens) == 2 and all(t.startswith("token_id:") for t in tokens), r.text
    finally:
        running.close()


def test_a_text_prompt_past_a_narrow_models_vocabulary_is_refused_at_intake(tmp_path: Path) -> None:
    """V is min(len(tokenizer), every width): a text prompt was encoded without the range check token-id
    prompts get, so an id a narrow model cannot embed reached its forward, and every later step raised
    IndexError with the good request stuck beside it."""
    from transformers import AutoModelForCausalLM

    large, rl, base = make_triple(tmp_path)
    narrow = AutoModelForCausalLM.from_pretrained(str(rl))
    narrow.resize_token_embeddings(60)  # below the tokenizer's ids
    narrow.save_pretrained(str(rl))
    engine = _engine((large, rl, base))
    assert engine.vocab_size == 60 < len(engine.tokenizer)
    text = "the cat sat on the mat"
    assert max(engine.tokenizer.encode(text)) >= 60, "the test needs a prompt with an id the narrow model lacks"
    engine.add_request("good", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    before = (engine.stats(), dict(engine.groups), list(engine.scheduler.waiting))
    with pytest.raises(RastError, match="narrower than the tokenizer"):
        engine.add_request("bad", text, SamplingParams(max_tokens=3))
    assert (engine.stats(), dict(engine.groups), list(engine.scheduler.waiting)) == before
    done: dict[str, list[int]] = {}
    _finish(engine, done)
    assert list(done) == ["good"] and len(done["good"]) == 3
