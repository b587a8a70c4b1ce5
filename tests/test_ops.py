"""rast_kernels' kernels as torch.library custom ops (rast_kernels/ops.py), for stacks that compile or export.

Oracles: torch.library.opcheck (torch's own checker: the schema's declared mutations are the real ones,
the fake implementation gives the real outputs' shapes, strides and dtypes, and the op survives
AOTAutograd with dynamic shapes), and the eager calls, which the other kernel tests check against the
torch reference, HF modules and an attention oracle: a function compiled with fullgraph=True (no graph
break allowed) or exported must give the eager results, cache writes included.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import rast_kernels
from rast_kernels import kv_store, layer_ops, ops, paged_attention
from rast_kernels.batch import normalize

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
SAMPLER_BACKENDS = [b for b in ("torch", "native", "triton") if b in rast_kernels.available_backends()]


def _logits(batch: int = 3, vocab: int = 61, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    m, r, s = (torch.randn(batch, vocab + 3 * i, generator=g).mul(3).to(DEV) for i in range(3))
    return m, r, s


def _sampler_args(backend: str, per_row: bool) -> tuple:
    m, r, s = _logits()
    rows = m.shape[0]
    params = dict(temperature=torch.tensor([0.0, 0.7, 1.3], device=DEV), top_p=torch.full((rows,), 0.9, device=DEV),
                  seed=torch.arange(rows, device=DEV) + 2**40, offset=torch.full((rows,), 5, device=DEV)) \
        if per_row else dict(temperature=0.8, top_k=7, min_p=0.05, seed=2**62 + 3, offset=11)
    batch = normalize(m, [(r, s)], weights=0.5, **params)
    return (batch.logits, batch.rl, batch.base, batch.weights, *ops.flatten_batch(batch), batch.vocab, backend)


@pytest.mark.parametrize("backend", SAMPLER_BACKENDS)
@pytest.mark.parametrize("per_row", [False, True], ids=["scalars", "tensors"])
def test_sampler_ops_pass_opcheck_and_equal_the_public_calls(backend: str, per_row: bool) -> None:
    args = _sampler_args(backend, per_row)
    torch.library.opcheck(ops.sample, args)
    torch.library.opcheck(ops.probs, args)
    m, r, s = _logits()
    params = dict(temperature=0.8, top_k=7, min_p=0.05, seed=2**62 + 3, offset=11) if not per_row else \
        dict(temperature=args[4][0], top_p=args[4][2], seed=args[4][4], offset=args[4][5])
    want = rast_kernels.rast_sample(m, [(r, s)], weights=0.5, backend=backend, **params)
    assert torch.equal(ops.sample(*args), want)  # int64 seeds beyond 2**53 travel exactly


def _compiled_sampler(backend: str, compiler: str):
    def step(m: torch.Tensor, r: torch.Tensor, s: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor):
        ids = rast_kernels.rast_sample(m, [(r, s)], weights=[0.75], temperature=0.9, top_p=0.9, min_p=0.01,
                                       seed=seed, offset=offset, backend=backend)
        p = rast_kernels.rast_probs(m, [(r, s)], weights=[0.75], temperature=0.9, top_p=0.9, min_p=0.01,
                                    backend=backend)
        return ids, p.gather(1, ids.clamp_min(0)[:, None])  # traced code around the ops
    return step, torch.compile(step, backend=compiler, fullgraph=True)


@pytest.mark.parametrize("backend", SAMPLER_BACKENDS)
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_the_sampler_compiles_without_graph_breaks(backend: str, compiler: str) -> None:
    torch._dynamo.reset()
    eager, compiled = _compiled_sampler(backend, compiler)
    for step in range(3):  # new seeds and offsets each call: the same graph, tensors as inputs
        m, r, s = _logits(seed=step)
        seed = torch.arange(3, device=DEV) * 7 + step
        offset = torch.full((3,), step, device=DEV)
        got, want = compiled(m, r, s, seed, offset), eager(m, r, s, seed, offset)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_export_writes_the_sampler_as_one_op(tmp_path) -> None:  # noqa: ANN001
    class Step(torch.nn.Module):
        def forward(self, m: torch.Tensor, r: torch.Tensor, s: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
            return rast_kernels.rast_sample(m, [(r, s)], weights=1.0, top_p=0.95, seed=seed, backend="torch")

    m, r, s = _logits()
    seed = torch.tensor([1, 2, 3], device=DEV)
    program = torch.export.export(Step(), (m, r, s, seed))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert "rast_kernels.sample.default" in targets, targets
    want = Step()(m, r, s, seed)
    assert torch.equal(program.module()(m, r, s, seed), want)
    # saved and loaded in a new process that only imports rast_kernels (the ops must be registered then)
    torch.export.save(program, tmp_path / "step.pt2")
    torch.save((m, r, s, seed, want), tmp_path / "inputs.pt")
    code = ("import torch, rast_kernels; p = torch.export.load(r'{0}/step.pt2'); "
            "m, r, s, seed, want = torch.load(r'{0}/inputs.pt'); "
            "assert torch.equal(p.module()(m, r, s, seed), want)").format(tmp_path)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def _paged(dtype: torch.dtype = torch.float32) -> dict:
    """A tiny paged cache: 2 sequences of 5 and 9 tokens in blocks of 4, GQA 4:2, head_dim 16."""
    g = torch.Generator().manual_seed(3)
    blocks, bs, hkv, hq, dim = 8, 4, 2, 4, 16
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)  # noqa: E731
    return dict(k_cache=rand(blocks, bs, hkv, dim), v_cache=rand(blocks, bs, hkv, dim),
                block_tables=torch.tensor([[5, 2, 0], [1, 7, 3]], dtype=torch.int32, device=DEV),
                context_lens=torch.tensor([5, 9], dtype=torch.int32, device=DEV),
                k=rand(2, hkv, dim), v=rand(2, hkv, dim), q=rand(2, hq, dim),
                slots=torch.tensor([5 * bs + 0, 3 * bs + 0], device=DEV), positions=torch.tensor([4, 8], device=DEV),
                cos_sin=rand(16, dim), x=rand(3, 40), w=rand(40), q_norm=rand(dim), k_norm=rand(dim))


def test_attention_and_layer_ops_pass_opcheck() -> None:
    c = _paged()
    cache = (c["k_cache"].clone(), c["v_cache"].clone())
    torch.library.opcheck(ops.store_kv_cache, (c["k"], c["v"], *cache, c["slots"]))
    torch.library.opcheck(ops.paged_decode_attention, (c["q"], c["k_cache"], c["v_cache"], c["block_tables"],
                                                       c["context_lens"], 0.25, 2, 4))
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEV)
    torch.library.opcheck(ops.paged_prefill_attention, (c["q"], c["k_cache"], c["v_cache"], c["block_tables"],
                                                        c["context_lens"], cu, 1, 0.25))
    torch.library.opcheck(ops.paged_decode_attention, (c["q"], c["k_cache"], c["v_cache"], c["block_tables"],
                                                       c["context_lens"], 0.25, 2, 4, 3))  # a sliding window
    torch.library.opcheck(ops.paged_prefill_attention, (c["q"], c["k_cache"], c["v_cache"], c["block_tables"],
                                                        c["context_lens"], cu, 1, 0.25, 3))
    torch.library.opcheck(ops.rms_norm, (c["x"], c["w"], 1e-6))
    torch.library.opcheck(ops.add_rms_norm, (c["x"], c["x"] * 0.5, c["w"], 1e-6))
    torch.library.opcheck(ops.silu_and_mul, (c["x"],))
    torch.library.opcheck(ops.gelu_tanh_and_mul, (c["x"],))
    g = torch.Generator().manual_seed(0)
    experts = (torch.randn(5, 16, 8, generator=g).to(DEV), torch.randn(5, 8, 8, generator=g).to(DEV))
    ids = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(3)]).to(DEV)
    torch.library.opcheck(ops.fused_moe, (c["x"][:3, :8].contiguous(), *experts, ids, torch.rand(3, 2, device=DEV),
                                          "triton", None, None))
    torch.library.opcheck(ops.moe_route, (c["x"][:3, :5].contiguous(), 2, True, torch.float32))
    torch.library.opcheck(ops.rotary_embedding, (c["positions"], c["q"], c["k"], c["cos_sin"], c["q_norm"],
                                                 c["k_norm"], 1e-6))
    torch.library.opcheck(ops.rotary_embedding_store_kv, (c["positions"], c["q"], c["k"], c["v"], c["cos_sin"],
                                                          *cache, c["slots"], None, None, 0.0))
    a, b = torch.randn(2 * 16, 8, generator=g).to(DEV), torch.randn(12, 2 * 16, generator=g).to(DEV)
    slots = torch.tensor([1, -1, 0], dtype=torch.int32, device=DEV)
    torch.library.opcheck(ops.lora_slots_add, (c["x"][:3, 20:32].contiguous(), c["x"][:3, :8].contiguous(), a, b,
                                               slots, 2, [0, 4], "triton"))


def _layer_step(c: dict, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A decode layer's kernels in order: norm, rotary + cache store, attention over what was just stored,
    activation. The attention must read the keys the store wrote."""
    h, s = layer_ops.add_rms_norm(c["x"], c["x"] * 0.5, c["w"], 1e-6)
    q, k = layer_ops.rotary_embedding_store_kv(c["positions"], c["q"], c["k"], c["v"], c["cos_sin"], k_cache,
                                               v_cache, c["slots"], (c["q_norm"], c["k_norm"], 1e-6))
    attn = paged_attention.paged_decode_attention(q, k_cache, v_cache, c["block_tables"], c["context_lens"], 0.25)
    kv_store.store_kv_cache(k * 2, c["v"], k_cache, v_cache, c["slots"])
    again = paged_attention.paged_decode_attention(q, k_cache, v_cache, c["block_tables"], c["context_lens"], 0.25)
    return layer_ops.rms_norm(h, c["w"], 1e-6), s, attn, again, layer_ops.silu_and_mul(c["x"])


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_a_layer_of_ops_compiles_and_keeps_cache_writes_in_order(compiler: str) -> None:
    torch._dynamo.reset()
    c = _paged()
    want_cache = (c["k_cache"].clone(), c["v_cache"].clone())
    want = _layer_step(c, *want_cache)
    got_cache = (c["k_cache"].clone(), c["v_cache"].clone())
    got = torch.compile(lambda kc, vc: _layer_step(c, kc, vc), backend=compiler, fullgraph=True)(*got_cache)
    assert not torch.equal(want[2], want[3])  # the second store changed what attention reads
    for g, w in zip(got + got_cache, want + want_cache):
        assert torch.equal(g, w)


@pytest.mark.gpu
def test_the_ops_compile_natively_on_the_gpu() -> None:
    """The same checks with CUDA tensors and compiled Triton kernels (DEV is cuda when CUDA is present)."""
    test_the_sampler_compiles_without_graph_breaks("triton", "aot_eager")
    test_a_layer_of_ops_compiles_and_keeps_cache_writes_in_order("aot_eager")


def test_export_keeps_a_dynamic_batch() -> None:
    """torch.export's default (non-strict) tracing with a dynamic batch: normalize took int() of it and
    specialised the program to the example's batch."""
    class Step(torch.nn.Module):
        def forward(self, m: torch.Tensor, r: torch.Tensor, s: torch.Tensor, seed: torch.Tensor) -> tuple:
            ids = rast_kernels.rast_sample(m, [(r, s)], temperature=0.8, top_p=0.9, seed=seed, backend="torch")
            return ids, rast_kernels.rast_logprobs(m, [(r, s)], temperature=0.8, top_p=0.9, backend="torch")

    batch = torch.export.Dim("batch", min=1, max=64)
    prog = torch.export.export(Step(), (*_logits(3), torch.arange(3)), dynamic_shapes=({0: batch},) * 4)
    args = (*_logits(5, seed=1), torch.arange(5))  # another batch size through the same program
    for got, want in zip(prog.module()(*args), Step()(*args)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("compiler", ["aot_eager"])
def test_grad_requiring_inputs_compile_as_eager(compiler: str) -> None:
    """An nn.Parameter weight, or logits computed outside no_grad: the traced op made AOTAutograd look for
    a backward formula and fail the compile; traced calls now see detached inputs, as the kernels do."""
    weight = torch.nn.Parameter(torch.rand(16, device=DEV) + 0.5)
    x = torch.randn(4, 16, device=DEV)
    norm = torch.compile(lambda x: layer_ops.rms_norm(x, weight, 1e-6), backend=compiler, fullgraph=True)
    torch.testing.assert_close(norm(x), layer_ops.rms_norm(x, weight, 1e-6))
    head = torch.nn.Linear(16, 61).to(DEV)
    probs = torch.compile(lambda x: rast_kernels.rast_probs(head(x), top_p=0.9), backend=compiler, fullgraph=True)
    got = probs(x)
    torch.testing.assert_close(got, rast_kernels.rast_probs(head(x).detach(), top_p=0.9))
    assert not got.requires_grad  # as the kernels' eager outputs: they are not differentiable
