"""vLLM's --served-model-name with several names: requests may name any of them, /v1/models lists them
all, and responses carry the first."""
from __future__ import annotations

import httpx
import openai
import pytest

from rast_engine.cli import build_parser
from rast_engine.errors import RastError
from rast_engine.server.app import OpenAIServer
from server_util import PROMPTS, Running, server_engine

NAMES = ("rast-7b", "qwen2.5-7b-rast")


def test_every_served_name_is_accepted_and_the_first_answers(server_triple: tuple) -> None:
    running = Running(OpenAIServer(server_engine(server_triple), model_name=list(NAMES)))
    try:
        client = running.client()
        assert [m.id for m in client.models.list().data] == list(NAMES)
        for name in NAMES:
            res = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=2, temperature=0)
            assert res.model == NAMES[0]
            r = httpx.post(f"{running.url}/tokenize", json={"model": name, "prompt": PROMPTS[0]}, timeout=60)
            assert r.status_code == 200, r.text
        with pytest.raises(openai.NotFoundError, match="rast-7b.*qwen2.5-7b-rast"):
            client.completions.create(model="other", prompt=PROMPTS[0], max_tokens=2)
    finally:
        running.close()


def test_names_are_checked_and_the_flag_takes_several(server_triple: tuple) -> None:
    for bad in ([], [""], "", ["a", 5]):
        with pytest.raises(RastError, match="model_name"):
            OpenAIServer(server_engine(server_triple), model_name=bad)  # type: ignore[arg-type]
    args = build_parser().parse_args(["serve", "m", "--served-model-name", *NAMES, "--port", "9"])
    assert args.served_model_name == list(NAMES) and args.port == 9
