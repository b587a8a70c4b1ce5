"""Test-wide setup. Without CUDA, Triton kernels run in the interpreter on CPU tensors; that switch
must be set before any module decorates a kernel, hence here, before the tests import rast_kernels."""
from __future__ import annotations

import os
from typing import Any

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The test models are tiny: intra-op threading only adds overhead on CI's 2 cores.
torch.set_num_threads(1)


def _interpreter_problem() -> str | None:
    """Triton < 3.7's interpreter takes int() of 1-element arrays, which numpy >= 2.3 refuses: every
    kernel with a tensor loop bound would fail with a TypeError deep inside the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import numpy
    import triton

    major_minor = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
    if major_minor(triton.__version__) < (3, 7) and major_minor(numpy.__version__) >= (2, 3):
        return (f"Triton {triton.__version__}'s interpreter does not work with numpy {numpy.__version__}: "
                "install 'numpy<2.3' or triton>=3.7")
    return None


def pytest_configure(config: pytest.Config) -> None:
    problem = _interpreter_problem()
    if problem:
        raise pytest.UsageError(problem)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _arch_triple(arch: str, what: str) -> Any:
    """A session fixture: (large_dir, rl_dir, base_dir) tiny random models of ``arch`` (``what`` they
    exercise), the large one untied at width 128, the small ones tied at width 112, one tokenizer."""
    @pytest.fixture(scope="session")
    def triple(tmp_path_factory: pytest.TempPathFactory) -> tuple:
        from factories import make_triple

        return make_triple(tmp_path_factory.mktemp(f"{arch}_triple"), arch)
    triple.__doc__ = f"tiny random {arch} models: {what}"
    return triple


qwen2_triple = _arch_triple("qwen2", "q/k/v bias")
qwen3_triple = _arch_triple("qwen3", "q/k norms per head, a head_dim of their own")
llama_triple = _arch_triple("llama", "llama3 rope scaling")
olmo2_triple = _arch_triple("olmo2", "q/k norms over all heads, post-norm layers")
olmo3_triple = _arch_triple("olmo3", "a 4-token sliding window in every other layer")
gemma3_triple = _arch_triple("gemma3", "sandwich norms, GELU, scaled embeddings, 4-token windows")
gemma2_triple = _arch_triple("gemma2", "capped attention scores and logits, windows in every other layer")
qwen3_moe_triple = _arch_triple("qwen3_moe", "four experts, two a token, renormalised; a dense layer in the large")
mixtral_triple = _arch_triple("mixtral", "four experts, two a token, float32 router weights")


@pytest.fixture(scope="session")
def json_triple(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A tiny Qwen2 triple whose tokenizer knows JSON's characters (structured outputs)."""
    from factories import JSON_CORPUS, make_triple

    return make_triple(tmp_path_factory.mktemp("json-triple"), extra_corpus=JSON_CORPUS)


@pytest.fixture(scope="session")
def near_triple(qwen2_triple: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """(large, rl, base) where the large model is the base with its logits scaled by 1.15: the small
    pair's drafts are often but not always accepted, so speculative rounds take both branches."""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    _, rl, base = qwen2_triple
    near = tmp_path_factory.mktemp("spec") / "near"
    shutil.copytree(base, near)
    f = next(Path(near).glob("*.safetensors"))
    w = load_file(f)
    w["model.norm.weight"] = w["model.norm.weight"] * 1.15
    save_file(w, f, metadata={"format": "pt"})
    return str(near), str(rl), str(base)


# ---- the server tests' (test_server*.py): a tiny random Qwen2 triple with tokenizer and chat template,
# the offline engine on it as the oracle, and a real server over it (one per test module)
@pytest.fixture(scope="session")
def server_triple(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    from factories import make_triple

    return make_triple(tmp_path_factory.mktemp("server-triple"))


@pytest.fixture(scope="session")
def server_oracle(server_triple: tuple):  # noqa: ANN201
    from rast_engine import LLM

    large, rl, base = server_triple
    return LLM(str(large), str(rl), str(base), lam=1.0, device="cpu", dtype="float32", kv_cache_blocks=256)


@pytest.fixture(scope="module")
def srv(server_triple: tuple):  # noqa: ANN201
    from rast_engine.server.app import OpenAIServer
    from server_util import MODEL, Running, server_engine

    running = Running(OpenAIServer(server_engine(server_triple, max_num_seqs=32), model_name=MODEL))
    yield running
    running.close()


@pytest.fixture(scope="session")
def lora_adapters(qwen2_triple: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(large, small base, {name: adapter}): two adapters of other ranks and targets, one with a
    rank_pattern."""
    from test_lora import make_adapter

    large, _, base = qwen2_triple
    root = tmp_path_factory.mktemp("lora_modules")
    math = make_adapter(base, root / "math", seed=21, r=4)
    code = make_adapter(base, root / "code", seed=22, r=2, target_modules=["q_proj", "v_proj", "down_proj"],
                        rank_pattern={"down_proj": 3})
    return large, base, {"math": str(math), "code": str(code)}
