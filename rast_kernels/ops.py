"""rast_kernels' public kernels as torch.library custom ops (namespace ``rast_kernels``), for stacks that
trace or compile their code: vLLM and SGLang compile the model forward with torch.compile, and export
pipelines run torch.export.

Why: traced as Python, a call would break the graph (the native sampler's ctypes call) or be inlined
kernel by kernel with its host-side launch logic; as a custom op it is one node that the compiler
leaves opaque, with a fake implementation giving output shapes, and torch.export writes it as
``torch.ops.rast_kernels.<name>``. Each public function (rast_sample, rast_probs, the attention and
layer kernels, the FP8 linear layer, the fused MoE, the LoRA slot deltas) takes this route only while
torch.compile or torch.export traces it (``torch.compiler.is_compiling()``); an eager call goes straight
to the kernels, since the dispatcher's custom-op path costs microseconds of host time that a decode step
at batch 1 cannot spare.

Invariants: an op's real implementation is the public function's eager path, so traced and eager
calls run the same kernels; outputs are fresh tensors (no op returns a view of an input); the ops that
write into the paged KV caches, or add LoRA deltas into a projection's output, declare exactly those writes
(``mutates_args``), so a compiler never reorders a read around them. tests/test_ops.py checks every op
with torch.library.opcheck.
"""
from __future__ import annotations

from typing import Optional

import torch

from rast_kernels import fp8_linear as fp8
from rast_kernels import kv_store, layer_ops, lora_slots, moe, moe_routing, paged_attention
from rast_kernels.batch import PARAMS, RowValue, SamplingBatch

Tensor = torch.Tensor
OptTensor = Optional[torch.Tensor]


FLOATS = [name for name, spec in PARAMS.items() if not spec.integral]  # temperature, top_p, min_p
INTS = [name for name, spec in PARAMS.items() if spec.integral]  # top_k, seed, offset (int64: seeds stay exact)


def flatten_batch(batch: SamplingBatch) -> tuple[list[OptTensor], list[float], list[int]]:
    """The six parameters in the ops' argument form: one tensor or None each (PARAMS order), and the
    scalars of the float and the integer ones (0 where the parameter is a tensor)."""
    tensors = [batch.params[name].tensor for name in PARAMS]
    floats = [float(batch.params[name].scalar or 0) for name in FLOATS]
    ints = [int(batch.params[name].scalar or 0) for name in INTS]
    return tensors, floats, ints


def traced(op: torch.library.CustomOpDef, *args: object) -> object:
    """``op(*args)`` as a public function calls it under tracing: with its tensor arguments detached where
    they require grad. The kernels are not differentiable (an eager call's outputs carry no grad), and a
    traced op fed a grad-requiring tensor (an nn.Parameter weight, logits outside no_grad) made AOTAutograd
    look for a backward formula and fail the compile."""
    return op(*(_detached(a) for a in args))


def _detached(a: object) -> object:
    if isinstance(a, torch.Tensor):
        return a.detach() if a.requires_grad else a
    if isinstance(a, (list, tuple)):
        return type(a)(_detached(x) for x in a)
    return a


def _batch(logits: Tensor, rl: list[Tensor], base: list[Tensor], weights: Tensor, tensors: list[OptTensor],
           floats: list[float], ints: list[int], vocab: int) -> SamplingBatch:
    scalars = dict(zip(FLOATS, floats)) | dict(zip(INTS, ints))
    params = {name: RowValue(None, t) if t is not None else RowValue(scalars[name], None)
              for name, t in zip(PARAMS, tensors)}
    return SamplingBatch(logits=logits, rl=rl, base=base, weights=weights, params=params, vocab=vocab)


@torch.library.custom_op("rast_kernels::sample", mutates_args=())
def sample(logits: Tensor, rl: list[Tensor], base: list[Tensor], weights: Tensor, tensors: list[OptTensor],
           floats: list[float], ints: list[int], vocab: int, backend: str) -> Tensor:
    from rast_kernels import backend_module

    return backend_module(backend).sample(_batch(logits, rl, base, weights, tensors, floats, ints, vocab))


@sample.register_fake
def _(logits, rl, base, weights, tensors, floats, ints, vocab, backend):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


@torch.library.custom_op("rast_kernels::probs", mutates_args=())
def probs(logits: Tensor, rl: list[Tensor], base: list[Tensor], weights: Tensor, tensors: list[OptTensor],
          floats: list[float], ints: list[int], vocab: int, backend: str) -> Tensor:
    from rast_kernels import backend_module

    return backend_module(backend).probs(_batch(logits, rl, base, weights, tensors, floats, ints, vocab))


@probs.register_fake
def _(logits, rl, base, weights, tensors, floats, ints, vocab, backend):
    return logits.new_empty((logits.shape[0], vocab), dtype=torch.float32)


@torch.library.custom_op("rast_kernels::store_kv_cache", mutates_args=("k_cache", "v_cache"))
def store_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    kv_store.store_kv_cache(k, v, k_cache, v_cache, slot_mapping)


@store_kv_cache.register_fake
def _(k, v, k_cache, v_cache, slot_mapping):
    return None


@torch.library.custom_op("rast_kernels::paged_decode_attention", mutates_args=())
def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                           context_lens: Tensor, scale: float, num_splits: Optional[int],
                           min_tokens_per_split: int, window: Optional[int] = None,
                           softcap: Optional[float] = None) -> Tensor:
    return paged_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                  num_splits=num_splits, min_tokens_per_split=min_tokens_per_split,
                                                  window=window, softcap=softcap)


@paged_decode_attention.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits, min_tokens_per_split, window=None,
      softcap=None):
    return torch.empty_like(q)


@torch.library.custom_op("rast_kernels::paged_prefill_attention", mutates_args=())
def paged_prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                            context_lens: Tensor, cu_seqlens_q: Tensor, max_seqlen_q: int, scale: float,
                            window: Optional[int] = None, softcap: Optional[float] = None) -> Tensor:
    return paged_attention.paged_prefill_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q,
                                                   max_seqlen_q, scale, window=window, softcap=softcap)


@paged_prefill_attention.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, max_seqlen_q, scale, window=None, softcap=None):
    return torch.empty_like(q)


@torch.library.custom_op("rast_kernels::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return layer_ops.rms_norm(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("rast_kernels::add_rms_norm", mutates_args=())
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return layer_ops.add_rms_norm(x, residual, weight, eps)


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def split_qk_norm(qk_norm: layer_ops.QKNorm | None) -> tuple[OptTensor, OptTensor, float]:
    """A QKNorm (q weight, k weight, eps) or None as the rotary ops' three arguments."""
    return (None, None, 0.0) if qk_norm is None else (qk_norm[0], qk_norm[1], float(qk_norm[2]))


def _qk_norm(q_weight: OptTensor, k_weight: OptTensor, eps: float) -> layer_ops.QKNorm | None:
    return None if q_weight is None or k_weight is None else (q_weight, k_weight, eps)


@torch.library.custom_op("rast_kernels::rotary_embedding", mutates_args=())
def rotary_embedding(positions: Tensor, q: Tensor, k: Tensor, cos_sin: Tensor, q_norm_weight: OptTensor,
                     k_norm_weight: OptTensor, norm_eps: float) -> tuple[Tensor, Tensor]:
    return layer_ops.rotary_embedding(positions, q, k, cos_sin, _qk_norm(q_norm_weight, k_norm_weight, norm_eps))


@rotary_embedding.register_fake
def _(positions, q, k, cos_sin, q_norm_weight, k_norm_weight, norm_eps):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("rast_kernels::rotary_embedding_store_kv", mutates_args=("k_cache", "v_cache"))
def rotary_embedding_store_kv(positions: Tensor, q: Tensor, k: Tensor, v: Tensor, cos_sin: Tensor, k_cache: Tensor,
                              v_cache: Tensor, slot_mapping: Tensor, q_norm_weight: OptTensor,
                              k_norm_weight: OptTensor, norm_eps: float) -> tuple[Tensor, Tensor]:
    return layer_ops.rotary_embedding_store_kv(positions, q, k, v, cos_sin, k_cache, v_cache, slot_mapping,
                                               _qk_norm(q_norm_weight, k_norm_weight, norm_eps))


@rotary_embedding_store_kv.register_fake
def _(positions, q, k, v, cos_sin, k_cache, v_cache, slot_mapping, q_norm_weight, k_norm_weight, norm_eps):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("rast_kernels::silu_and_mul", mutates_args=())
def silu_and_mul(gate_up: Tensor) -> Tensor:
    return layer_ops.silu_and_mul(gate_up)


@silu_and_mul.register_fake
def _(gate_up):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.custom_op("rast_kernels::gelu_tanh_and_mul", mutates_args=())
def gelu_tanh_and_mul(gate_up: Tensor) -> Tensor:
    return layer_ops.gelu_tanh_and_mul(gate_up)


@gelu_tanh_and_mul.register_fake
def _(gate_up):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.custom_op("rast_kernels::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, w8: Tensor, scale: Tensor, bias: OptTensor, backend: str) -> Tensor:
    return fp8.fp8_linear(x, w8, scale, bias, backend)


@fp8_linear.register_fake
def _(x, w8, scale, bias, backend):
    return x.new_empty((*x.shape[:-1], w8.shape[0]))


@torch.library.custom_op("rast_kernels::fused_moe", mutates_args=())
def fused_moe(x: Tensor, gate_up: Tensor, down: Tensor, topk_ids: Tensor, topk_weights: Tensor,
              backend: str, gate_up_scale: OptTensor, down_scale: OptTensor) -> Tensor:
    return moe.fused_moe(x, gate_up, down, topk_ids, topk_weights, backend, gate_up_scale, down_scale)


@fused_moe.register_fake
def _(x, gate_up, down, topk_ids, topk_weights, backend, gate_up_scale, down_scale):
    return x.new_empty(x.shape)


@torch.library.custom_op("rast_kernels::moe_route", mutates_args=())
def moe_route(logits: Tensor, top_k: int, renormalize: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return moe_routing.moe_route(logits, top_k, renormalize, dtype)


@moe_route.register_fake
def _(logits, top_k, renormalize, dtype):
    return (logits.new_empty((logits.shape[0], top_k), dtype=torch.int32),
            logits.new_empty((logits.shape[0], top_k), dtype=dtype))


@torch.library.custom_op("rast_kernels::lora_slots_add", mutates_args=("y",))
def lora_slots_add(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, slots: Tensor, max_loras: int,
                   part_starts: list[int], backend: str) -> None:
    lora_slots.lora_slots_add_(y, x, lora_a, lora_b, slots, max_loras, part_starts, backend)


@lora_slots_add.register_fake
def _(y, x, lora_a, lora_b, slots, max_loras, part_starts, backend):
    return None
