"""Default sampling parameters from generation_config.json (vLLM's --generation-config): what is read,
what a bad file says, and that the defaults reach LLM.generate, the server and `rast generate` exactly
where the caller leaves a field unset. The oracle is the same engine given the same values explicitly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from server_util import MODEL, Running, server_engine

from rast_engine import LLM, SamplingParams
from rast_engine.cli import main
from rast_engine.errors import ModelLoadError
from rast_engine.generation_config import sampling_defaults
from rast_engine.server.app import OpenAIServer

SAMPLED = {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.01, "repetition_penalty": 1.3,
           "max_new_tokens": 6}
GREEDY = {"temperature": 0.0, "repetition_penalty": 1.3, "max_new_tokens": 6}


def config_dir(root: Path, name: str, fields: dict) -> str:
    """A directory holding only a generation_config.json (as a model's, with fields vLLM ignores)."""
    d = root / name
    d.mkdir()
    (d / "generation_config.json").write_text(json.dumps({"do_sample": True, "eos_token_id": 2, **fields}))
    return str(d)


def params_of(fields: dict, **kw: object) -> SamplingParams:
    explicit = {("max_tokens" if k == "max_new_tokens" else k): v for k, v in fields.items()}
    return SamplingParams(**{**explicit, **kw})


def test_what_is_read(tmp_path: Path, qwen2_triple: tuple, caplog: pytest.LogCaptureFixture) -> None:
    d = config_dir(tmp_path, "gc", SAMPLED)
    want = {("max_tokens" if k == "max_new_tokens" else k): v for k, v in SAMPLED.items()}
    assert sampling_defaults(d, "unused") == want
    assert sampling_defaults("auto", d) == want  # auto: the large model's own directory
    assert sampling_defaults("vllm", d) == {}
    assert "repetition_penalty=1.3" in caplog.text  # every defaulted request is penalized: said once, loudly
    assert sampling_defaults("auto", str(qwen2_triple[0])) == {}  # token ids only: no sampling fields
    assert sampling_defaults("auto", str(tmp_path)) == {}  # no file: nothing to read
    with pytest.raises(ModelLoadError, match="no generation_config.json"):
        sampling_defaults(str(tmp_path), "unused")
    with pytest.raises(ModelLoadError, match="temperature"):
        sampling_defaults(config_dir(tmp_path, "bad", {"temperature": -1}), "unused")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "generation_config.json").write_text("{")
    with pytest.raises(ModelLoadError, match="JSON"):
        sampling_defaults(str(tmp_path / "broken"), "unused")


def test_llm_generate_without_params_uses_the_defaults(tmp_path: Path, qwen2_triple: tuple) -> None:
    """Two engines of one seed give their first unseeded request the same seed, so the defaulted call
    must draw the tokens of the explicit one, and differ from vLLM's neutral defaults."""
    large, rl, base = map(str, qwen2_triple)
    kw = dict(device="cpu", dtype="float32", kv_cache_blocks=64, seed=1)
    prompt = [5, 9, 9, 17, 4, 9]
    llm = LLM(large, rl, base, generation_config=config_dir(tmp_path, "gc", SAMPLED), **kw)
    assert llm.get_default_sampling_params() == params_of(SAMPLED)
    got = llm.generate(prompt, use_tqdm=False)[0].outputs[0].token_ids
    explicit = LLM(large, rl, base, generation_config="vllm", **kw)
    assert explicit.get_default_sampling_params() == SamplingParams()
    assert got == explicit.generate(prompt, params_of(SAMPLED), use_tqdm=False)[0].outputs[0].token_ids
    neutral = LLM(large, rl, base, **kw).generate(prompt, use_tqdm=False)[0].outputs[0].token_ids
    assert len(got) == 6 and len(neutral) == 16


def test_a_speculative_engine_keeps_a_default_penalty(tmp_path: Path, qwen2_triple: tuple) -> None:
    """Speculative rounds adjust the logits as plain steps do (engine/speculative/adjust.py), so a
    generation config's repetition_penalty applies, with the plain engine's greedy tokens."""
    large, rl, base = map(str, qwen2_triple)
    kw = dict(generation_config=config_dir(tmp_path, "gc", GREEDY), device="cpu", dtype="float32", kv_cache_blocks=64)
    llm = LLM(large, rl, base, speculative_tokens=2, **kw)
    assert llm.get_default_sampling_params() == params_of(GREEDY)
    got = llm.generate([5, 9, 9, 17], use_tqdm=False)[0].outputs[0].token_ids
    assert len(got) == 6 and got == LLM(large, rl, base, **kw).generate([5, 9, 9, 17], use_tqdm=False)[0].outputs[0].token_ids


def test_the_server_fills_omitted_fields(tmp_path: Path, server_triple: tuple, server_oracle: LLM) -> None:
    engine = server_engine(server_triple, generation_config=config_dir(tmp_path, "gc", GREEDY))
    running = Running(OpenAIServer(engine, model_name=MODEL))
    try:
        client, messages = running.client(), [{"role": "user", "content": "what is the answer?"}]
        res = client.chat.completions.create(model=MODEL, messages=messages)
        want = server_oracle.chat(messages, params_of(GREEDY), use_tqdm=False)[0].outputs[0]
        assert (res.choices[0].message.content, res.usage.completion_tokens) == (want.text, 6)
        # a field the request sets wins over the generation config's
        res = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9,
                                             extra_body={"repetition_penalty": 1.0})
        want = server_oracle.chat(messages, params_of(GREEDY, max_tokens=9, repetition_penalty=1.0),
                                  use_tqdm=False)[0].outputs[0]
        assert want.text != server_oracle.chat(messages, params_of(GREEDY, max_tokens=9), use_tqdm=False)[0].outputs[0].text
        assert res.choices[0].message.content == want.text
    finally:
        running.close()


def test_rast_generate_takes_the_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          server_triple: tuple, server_oracle: LLM) -> None:
    large, rl, base = map(str, server_triple)
    prompt = "what is the answer?"
    want = server_oracle.generate(prompt, params_of(GREEDY), use_tqdm=False)[0].outputs[0].text
    flags = ["--small-rl", rl, "--small-base", base, "--device", "cpu", "--dtype", "float32",
             "--kv-cache-blocks", "64", "--generation-config", config_dir(tmp_path, "gc", GREEDY)]
    assert main(["generate", large, *flags, "--prompt", prompt]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["generate", large, *flags, "--generation-config", str(tmp_path), "--prompt", prompt]) == 2
    assert "no generation_config.json" in capsys.readouterr().err
