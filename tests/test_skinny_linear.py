"""rast_kernels.skinny_linear: F.linear for decode's few rows. Oracle: float64 x Wᵀ + b, which the kernel must
match to float32 accumulation error, then one rounding to the output dtype; natively on a GPU also at a
real projection's shape."""
from __future__ import annotations

import pytest
import torch

from rast_kernels.skinny_linear import MAX_ROWS, skinny_linear

HAS_CUDA = torch.cuda.is_available()
_interp = pytest.mark.skipif(HAS_CUDA, reason="with CUDA the kernel compiles natively instead")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CASES = [pytest.param("cpu", dt, id=f"interp-{name}", marks=_interp) for name, dt in DTYPES.items()]
CASES += [pytest.param("cuda", dt, id=f"cuda-{name}", marks=pytest.mark.gpu) for name, dt in DTYPES.items()]


def _check(device: str, dtype: torch.dtype, m: int, n: int, k: int, bias: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None
    want = x.double() @ w.double().t() + (b.double() if bias else 0)
    got = skinny_linear(x.to(device), w.to(device), None if b is None else b.to(device))
    assert got.dtype == dtype and got.shape == (m, n)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else \
        dict(atol=2e-3, rtol=torch.finfo(dtype).eps)  # one rounding to the output dtype
    torch.testing.assert_close(got.double().cpu(), want.to(dtype).double(), **tol)


@pytest.mark.parametrize("device, dtype", CASES)
@pytest.mark.parametrize("m", range(1, MAX_ROWS + 1))
@pytest.mark.parametrize("n, k, bias", [(37, 70, True), (9, 33, False)])  # no multiple of a tile
def test_skinny_linear_is_x_w_transposed_plus_b(device: str, dtype: torch.dtype, m: int, n: int, k: int,
                                                bias: bool) -> None:
    _check(device, dtype, m, n, k, bias, seed=m * 100 + n)


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(3584, 18944), (4608, 3584), (152064, 3584)])  # Qwen2.5-7B's down, qkv, lm_head
def test_skinny_linear_at_real_shapes(n: int, k: int) -> None:
    _check("cuda", torch.bfloat16, 2, n, k, True, seed=n)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=_interp), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_strided_rows_and_refusals(device: str) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 16, generator=g).to(device)
    x = torch.randn(3, 32, generator=g).to(device)[:, ::2]  # last dim strided
    torch.testing.assert_close(skinny_linear(x, w), x @ w.t(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="1 <= M"):
        skinny_linear(torch.zeros(MAX_ROWS + 1, 16, device=device), w)
    with pytest.raises(ValueError, match="share one of"):
        skinny_linear(x.double(), w)
    with pytest.raises(ValueError, match="weight must be"):
        skinny_linear(x, w[:, :8])


def test_decode_linear_skinny_decodes_as_hf(qwen2_triple: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """decode_linear="skinny": the large model's projections and lm_head run the kernel at decode (1 to 4 rows,
    interpreted here), F.linear at prefill; greedy RAST equals HF transformers' Eq. 3 (float32)."""
    from test_engine import LAM, PROMPTS, hf_greedy

    from rast_engine import LLM, SamplingParams
    from rast_engine.models import skinny

    calls: list[int] = []
    kernel = skinny.skinny_linear
    monkeypatch.setattr(skinny, "skinny_linear", lambda x, w, b=None: calls.append(x.shape[0]) or kernel(x, w, b))
    llm = LLM(*map(str, qwen2_triple), lam=LAM, block_size=4, kv_cache_blocks=64, device="cpu", dtype="float32",
              decode_linear="skinny")
    large = llm.llm_engine.runner.units[0]
    assert all(type(m) is skinny.SkinnyLinear for m in (large.lm_head, large.layers[0].mlp.down_proj))
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    outs = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    for out in outs:
        assert out.outputs[0].token_ids == hf_greedy(qwen2_triple, out.prompt_token_ids, LAM,
                                                     llm.llm_engine.vocab_size, 3)
    assert calls and set(calls) <= {1, 2}  # decode steps of the two sequences; the prefills ran F.linear


@_interp
def test_decode_linear_skinny_replays_in_graphs(qwen2_triple: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the CUDA emulator (captures re-issue their kernels with host values frozen; a host read inside
    a capture fails): a batch of 2 padded to bucket 4 replays the skinny kernel in the step's graph, on two
    streams, and draws the eager engine's tokens."""
    from cuda_emulator import emulated_cuda
    from fast_path_util import capturable_engine, prompts
    from test_emulated_fast_path import generate_all, install_fast_path

    from rast_engine import SamplingParams

    params, batch = SamplingParams(temperature=0.9, top_k=20, max_tokens=3, ignore_eos=True, seed=11), prompts(2, 5)
    want = generate_all(capturable_engine(qwen2_triple, decode_linear="skinny"), batch, params)
    engine = capturable_engine(qwen2_triple, decode_linear="skinny")
    with emulated_cuda(monkeypatch) as emu:
        install_fast_path(engine.runner)
        got = generate_all(engine, batch, params)
    assert got == want and emu.replays == 2 * (params.max_tokens - 1)
