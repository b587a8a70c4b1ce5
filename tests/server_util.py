"""Shared by the server tests: a real uvicorn server in a thread, the tiny engine behind it, and its
/metrics parsed."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from rast_engine import EngineConfig, LLMEngine
from rast_engine.server.app import OpenAIServer

MODEL = "tiny-rast"
PROMPTS = ["the cat sat on", "what is the answer?", "3 + 5 =", "hello world! this"]


class Running:
    """A uvicorn server in a thread on an ephemeral loopback port; close() always shuts it down."""

    def __init__(self, server: OpenAIServer) -> None:
        self.server = server
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uv = uvicorn.Server(uvicorn.Config(server.app(), log_level="warning"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uv.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def close(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=30)


def server_engine(dirs: tuple[Path, Path, Path], **kw: Any) -> LLMEngine:
    large, rl, base = dirs
    return LLMEngine(EngineConfig(str(large), str(rl), str(base), lam=1.0, device="cpu", dtype="float32",
                                  kv_cache_blocks=256, **kw))


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if not s.labels}
