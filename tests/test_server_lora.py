"""vLLM's --lora-modules on the server: a request naming an adapter as its model decodes with that adapter
as its RL model, one naming the served model decodes M alone; /v1/models lists the adapters with their
parent. Oracle: the offline engine whose small_rl is that adapter (test_lora.py checks it against PEFT)."""
from __future__ import annotations

import httpx
import openai
import pytest

from rast_engine import LLM, SamplingParams
from rast_engine.cli import build_parser
from rast_engine.config import EngineConfig
from rast_engine.errors import RastError
from rast_engine.llm_engine import LLMEngine
from rast_engine.server.app import OpenAIServer
from server_util import PROMPTS, Running
from test_lora import make_adapter

pytest.importorskip("peft")
KW = dict(lam=1.0, device="cpu", dtype="float32", kv_cache_blocks=256)


@pytest.fixture(scope="module")
def modules(server_triple: tuple, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base, root = server_triple[2], tmp_path_factory.mktemp("server-lora")
    return {"math": str(make_adapter(base, root / "math", seed=31)),
            "code": str(make_adapter(base, root / "code", seed=32, r=2, target_modules=["q_proj", "down_proj"]))}


def test_a_request_naming_an_adapter_decodes_with_it(server_triple: tuple, modules: dict[str, str]) -> None:
    large, _, base = map(str, server_triple)
    engine = LLMEngine(EngineConfig(large, small_base=base, lora_modules=modules, **KW))
    running = Running(OpenAIServer(engine, model_name="rast"))
    try:
        client = running.client()
        cards = client.models.list().data
        assert [m.id for m in cards] == ["rast", "math", "code"]
        assert [getattr(m, "parent", None) for m in cards] == [None, "rast", "rast"]
        oracles = {"rast": LLM(large, device="cpu", dtype="float32", kv_cache_blocks=256)}
        oracles.update({n: LLM(large, p, base, **KW) for n, p in modules.items()})
        texts = set()
        for name, oracle in oracles.items():
            res = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=6, temperature=0)
            want = oracle.generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0.0),
                                   use_tqdm=False)[0].outputs[0].text
            assert res.model == name and res.choices[0].text == want, name
            texts.add(want)
        assert len(texts) == 3  # the adapter chosen shows in the text
        chat = client.chat.completions.create(model="code", messages=[{"role": "user", "content": PROMPTS[1]}],
                                              max_tokens=4, temperature=0)
        assert chat.model == "code" and chat.choices[0].message.content is not None
        with pytest.raises(openai.NotFoundError, match="'rast', 'math', 'code'"):
            client.completions.create(model="law", prompt=PROMPTS[0], max_tokens=2)
        metrics = httpx.get(f"{running.url}/metrics", timeout=60).text  # vLLM's gauge, nothing running now
        assert 'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}' in metrics
    finally:
        running.close()


def test_the_flag_parses_and_names_must_not_clash(server_triple: tuple, modules: dict[str, str]) -> None:
    args = build_parser().parse_args(["serve", "m", "--small-base", "b", "--lora-modules", "math=/a",
                                      '{"name": "code", "path": "/b"}'])
    assert args.lora_modules == ["math=/a", '{"name": "code", "path": "/b"}']
    large, _, base = map(str, server_triple)
    engine = LLMEngine(EngineConfig(large, small_base=base, lora_modules=modules, **KW))
    with pytest.raises(RastError, match="also served model names"):
        OpenAIServer(engine, model_name=["rast", "math"])
    from rast_engine.commands import build_engine

    missing = build_parser().parse_args(["serve", large, "--small-base", base, "--lora-modules", "a=/no/such/dir"])
    with pytest.raises(RastError, match="--lora-modules a: no such model directory"):
        build_engine(missing)  # before any model is loaded
    empty = build_engine(build_parser().parse_args(["serve", large, "--small-base", base, "--enable-lora",
                                                     "--max-lora-rank", "8", "--max-cpu-loras", "3", "--device",
                                                     "cpu"]))
    assert empty.model_set.lora.slots == [None] and empty.model_set.lora.max_rank == 8
    assert empty.model_set.lora.host_copies == 3


def test_adapters_load_and_unload_while_serving_when_allowed(server_triple: tuple, modules: dict[str, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, present only with
    VLLM_ALLOW_RUNTIME_LORA_UPDATING set (as vLLM's)."""
    large, _, base = map(str, server_triple)

    def server() -> Running:
        config = EngineConfig(large, small_base=base, lora_modules={"math": modules["math"]}, max_loras=2, **KW)
        return Running(OpenAIServer(LLMEngine(config), model_name="rast"))

    closed = server()
    try:
        r = httpx.post(f"{closed.url}/v1/load_lora_adapter", json={"lora_name": "code", "lora_path": modules["code"]})
        assert r.status_code == 404
    finally:
        closed.close()
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    running = server()
    try:
        client, url = running.client(), running.url
        for body, status, text in (({"lora_name": "code", "lora_path": modules["code"]}, 200, "added successfully"),
                                   ({"lora_name": "code", "lora_path": modules["code"]}, 400, "already loaded"),
                                   ({"lora_name": "rast", "lora_path": modules["code"]}, 400, "served model name"),
                                   ({"lora_name": "x", "lora_path": "/no/such"}, 400, "not a PEFT LoRA adapter")):
            r = httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=60)
            assert r.status_code == status and text in r.text, r.text
        assert [m.id for m in client.models.list().data] == ["rast", "math", "code"]
        want = LLM(large, modules["code"], base, **KW).generate(
            [PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)[0].outputs[0].text
        assert client.completions.create(model="code", prompt=PROMPTS[0], max_tokens=6, temperature=0).choices[
            0].text == want
        r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "code"}, timeout=60)
        assert r.status_code == 200 and "removed successfully" in r.text
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="code", prompt=PROMPTS[0], max_tokens=2)
        r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "code"}, timeout=60)
        assert r.status_code == 400 and "no LoRA adapter named 'code'" in r.text
    finally:
        running.close()
