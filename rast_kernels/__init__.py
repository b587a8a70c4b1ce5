"""rast_kernels: fused RAST sampling and paged-attention kernels, embeddable in any serving stack.

    rast_sample(logits, deltas, ...) -> int64 [B]      one token per row, -1 if no token is admissible
    rast_probs(logits, deltas, ...)  -> float32 [B, V] the exact distribution rast_sample draws from
    rast_logprobs(logits, deltas, ...) -> float32 [B, V] its logarithm, finite on every admissible token

with z = logits[:, :V] + sum_k w_k * (rl_k[:, :V] - base_k[:, :V]), then temperature, top-k, top-p and
min-p (HF order). The torch backend (rast_kernels.reference) is the executable spec; the Triton and
native backends must agree with it.

Paged KV attention kernels for serving stacks live in rast_kernels.paged_attention (store by slot
mapping, split-K decode with GQA, varlen prefill over a paged cache); LoRA deltas of adapters chosen per
token, reading only the adapters in use, in rast_kernels.lora_slots.

Under torch.compile or torch.export every public kernel is one torch.library custom op
(torch.ops.rast_kernels.*, registered by rast_kernels.ops on import), so tracing never breaks the graph.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from rast_kernels.batch import RowParam, Scalar, SamplingBatch, normalize

__all__ = ["rast_sample", "rast_probs", "rast_logprobs", "available_backends", "default_backend", "SamplingBatch"]

BACKENDS = ("torch", "triton", "native")


def _native_available() -> bool:
    from rast_kernels import native

    return native.is_available()


def available_backends() -> list[str]:
    """Backends usable in this process; "triton" needs CUDA or TRITON_INTERPRET=1."""
    from rast_kernels.launch import interpreting

    out = ["torch"]
    if torch.cuda.is_available() or interpreting():
        out.append("triton")
    if _native_available():
        out.append("native")
    return out


def default_backend(device: torch.device) -> str:
    """What backend=None picks for tensors on ``device``: triton on CUDA, else native when built, else torch."""
    if torch.device(device).type == "cuda":
        return "triton"
    return "native" if _native_available() else "torch"


def _backend_name(backend: str | None, batch: SamplingBatch) -> str:
    """The backend that serves ``batch``, checked against the install and the tensors' device."""
    if backend is None:
        return default_backend(batch.logits.device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} or None")
    if backend == "native":
        from rast_kernels import native

        if not native.is_available():
            raise RuntimeError(f"backend='native' is not built in this install: {native.unavailable_reason()}")
        if batch.logits.is_cuda:
            raise ValueError("backend='native' runs on CPU tensors only; these logits are on CUDA")
    if backend == "triton" and not batch.logits.is_cuda:
        from rast_kernels.launch import interpreting

        if not interpreting():
            raise ValueError("backend='triton' runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 "
                             "(set before triton is imported); these logits are on the CPU")
    return backend


def backend_module(name: str):
    """The module implementing backend ``name`` (its sample(batch) and probs(batch))."""
    if name == "torch":
        from rast_kernels import reference as impl
    elif name == "triton":
        from rast_kernels import sampler_triton as impl
    else:
        from rast_kernels import native as impl
    return impl


def _run(kind: str, batch: SamplingBatch, backend: str | None) -> torch.Tensor:
    name = _backend_name(backend, batch)
    if torch.compiler.is_compiling():  # one opaque op for torch.compile / torch.export (rast_kernels.ops)
        op = ops.sample if kind == "sample" else ops.probs
        return ops.traced(op, batch.logits, batch.rl, batch.base, batch.weights, *ops.flatten_batch(batch),
                          batch.vocab, name)
    impl = backend_module(name)
    return impl.sample(batch) if kind == "sample" else impl.probs(batch)


def rast_sample(logits: torch.Tensor, deltas: Sequence[tuple[torch.Tensor, torch.Tensor]] = (), *,
                weights: Union[Scalar, Sequence[Scalar], torch.Tensor] = 1.0, temperature: RowParam = 1.0,
                top_k: RowParam = 0, top_p: RowParam = 1.0, min_p: RowParam = 0.0, seed: RowParam = 0,
                offset: RowParam = 0, vocab_size: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Draw one token id per row (int64 [B]); -1 for a row with no admissible token."""
    batch = normalize(logits, deltas, weights=weights, temperature=temperature, top_k=top_k, top_p=top_p,
                      min_p=min_p, seed=seed, offset=offset, vocab_size=vocab_size)
    return _run("sample", batch, backend)


def rast_probs(logits: torch.Tensor, deltas: Sequence[tuple[torch.Tensor, torch.Tensor]] = (), *,
               weights: Union[Scalar, Sequence[Scalar], torch.Tensor] = 1.0, temperature: RowParam = 1.0,
               top_k: RowParam = 0, top_p: RowParam = 1.0, min_p: RowParam = 0.0,
               vocab_size: int | None = None, backend: str | None = None) -> torch.Tensor:
    """The filtered, renormalised distribution (float32 [B, V]) that rast_sample draws from."""
    batch = normalize(logits, deltas, weights=weights, temperature=temperature, top_k=top_k, top_p=top_p,
                      min_p=min_p, vocab_size=vocab_size)
    return _run("probs", batch, backend)


def rast_logprobs(logits: torch.Tensor, deltas: Sequence[tuple[torch.Tensor, torch.Tensor]] = (), *,
                  weights: Union[Scalar, Sequence[Scalar], torch.Tensor] = 1.0, temperature: RowParam = 1.0,
                  top_k: RowParam = 0, top_p: RowParam = 1.0, min_p: RowParam = 0.0,
                  vocab_size: int | None = None, backend: str | None = None) -> torch.Tensor:
    """log rast_probs (float32 [B, V]), computed in log space: -d_i - log sum_A w_j on the admissible set
    A, -inf elsewhere. rast_probs' float32 entries underflow to 0 below about 1e-45 (a logprob below
    -103: common at low temperature), where this stays finite and exact, as vLLM's processed logprobs
    do. p at the mode, never below 1 / V, gives the normaliser.

    A is the backend's support plus the admissible tokens whose probability underflowed. Those have
    w = exp(-d) below float32's smallest normal, so in the spec (rast_kernels.reference) top-p < 1 drops
    them (the mass above them is the whole mass) and min-p drops them unless min_p <= w; only top-k can
    keep them, by its k-th smallest d: a top-k of k values for a scalar k, a sort of the rows for a per-row
    tensor (whose values are not read on the host)."""
    from rast_kernels import reference

    batch = normalize(logits, deltas, weights=weights, temperature=temperature, top_k=top_k, top_p=top_p,
                      min_p=min_p, vocab_size=vocab_size)
    p = _run("probs", batch, backend)
    _, finite, d = reference.distances(batch)  # d = (zmax - z) / T, with T = 1 on greedy rows (one-hot there)
    sampled = (batch.temperature > 0) & (batch.top_p >= 1.0)
    underflowed = finite & sampled[:, None] & (torch.exp(-d) >= batch.min_p[:, None]) & _kept_by_top_k(batch, d)
    support = (p > 0) | underflowed
    return torch.where(support, p.amax(dim=1, keepdim=True).log() - d, float("-inf"))


def _kept_by_top_k(batch: SamplingBatch, d: torch.Tensor) -> torch.Tensor:
    """[B, V] bool: d within the row's k smallest (ties at the k-th kept), or every token where top-k is off."""
    v, k = batch.vocab, batch.params["top_k"]
    if k.tensor is None:
        if not 0 < int(k.scalar) < v:
            return torch.ones_like(d, dtype=torch.bool)
        return d <= torch.topk(d, int(k.scalar), dim=1, largest=False).values[:, -1:]
    rows = batch.top_k.to(torch.int64)
    kth = torch.sort(d, dim=1).values.gather(1, (rows.clamp(1, v) - 1)[:, None])
    return ~((rows > 0) & (rows < v))[:, None] | (d <= kth)


# registers torch.ops.rast_kernels.* now, so torch.export.load finds them after `import rast_kernels`
from rast_kernels import ops  # noqa: E402,F401
