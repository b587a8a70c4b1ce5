"""The decode fast path on the CPU: static buffers, padded batches, model streams and the step that CUDA
graphs capture. These tests run every branch that does not need CUDA (buffer filling and the
host-to-device copy path, block-table caching, padding rows, the exact step function that graphs
capture, with Triton kernels in the interpreter); tests/test_gpu_engine.py compares the fast path with
its slow twin on a real device.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from fast_path_util import BS, GREEDY, LAM, generate, make_engine, prompts
from rast_engine import LLMEngine, SamplingParams
from rast_engine.cuda_graph import DecodeGraphs, batch_buckets
from rast_engine.decode_buffers import DecodeBuffers
from rast_engine.model_streams import ModelStreams
from rast_engine.sequence import PENDING


# ---- CPU: every branch that runs without CUDA -------------------------------------------------------
def test_batch_buckets_cover_every_batch() -> None:
    for max_rows in (1, 3, 8, 17, 48, 256):
        buckets = batch_buckets(max_rows)
        assert buckets == sorted(set(buckets)) and buckets[-1] == max_rows
        for n in range(1, max_rows + 1):
            b = min(x for x in buckets if x >= n)
            assert b - n < 16 and (n > 8 or b < 2 * n)  # padding waste stays bounded
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs((lambda rows: None,), lambda rows: None, torch.device("cpu"), 4)
    assert not ModelStreams(torch.device("cpu"), True).concurrent


def test_decode_buffers_follow_block_tables_through_every_change() -> None:
    """Random appends, copy-on-write of the last block, reassignment and reordering, with input tokens
    known on the host or fed from the previous step's sampled ids; every fill (through alternating
    staging sets) must equal a from-scratch layout, padding rows must be inert, and the device copy must
    equal staging."""
    rng = random.Random(0)
    max_rows, width, pairs = 6, 12, 2
    buf = DecodeBuffers(max_rows, width, pairs, BS, torch.device("cpu"), staging=True)
    seqs = [SimpleNamespace(token_ids=[1] * rng.randrange(1, 9), block_table=[], num_pending=0,
                            group=SimpleNamespace(lora_slot=rng.randrange(-1, 3))) for _ in range(max_rows)]
    for s in seqs:
        s.block_table = [rng.randrange(100) for _ in range(-(-len(s.token_ids) // BS))]
    for _ in range(60):
        for s in seqs:
            op = rng.random()
            if op < 0.5 and len(s.token_ids) < width * BS:  # one more token, maybe one more block
                s.token_ids.append(rng.randrange(100))
                if len(s.block_table) * BS < len(s.token_ids):
                    s.block_table.append(rng.randrange(100))
            elif op < 0.6:
                s.block_table[-1] = rng.randrange(100)  # copy-on-write of the block being written
            elif op < 0.65:
                s.block_table = list(s.block_table)  # reassigned (e.g. preempted and re-prefilled)
                s.block_table[0] = rng.randrange(100)
        batch = rng.sample(seqs, rng.randrange(1, max_rows + 1))
        n, rows = len(batch), rng.randrange(len(batch), max_rows + 1)
        temps = [rng.random() for _ in batch]
        weights = [[rng.random(), -rng.random()] for _ in batch]
        feed, sampled = None, torch.tensor([rng.randrange(1000) for _ in range(max_rows)])
        if rng.random() < 0.4:  # the batch's last tokens are pending: fed from the previous step's rows
            buf.store_sampled(sampled)
            feed = [rng.randrange(max_rows) for _ in batch]
            for s in batch:
                s.token_ids[-1], s.num_pending = PENDING, 1
        buf.fill(batch, temperature=temps, top_k=[3] * n, top_p=[0.5] * n, min_p=[0.1] * n,
                 seeds=list(range(n)), offsets=[7] * n, weights=weights, rows=rows, feed=feed)
        if feed is not None:
            assert buf.input_ids(rows)[:n].tolist() == [int(sampled[f]) for f in feed]
            for s, f in zip(batch, feed):
                s.token_ids[-1], s.num_pending = int(sampled[f]), 0
        meta = buf.meta(rows, width * BS)
        for i, s in enumerate(batch):
            t, pos = s.block_table, len(s.token_ids) - 1
            assert meta.block_tables[i, :len(t)].tolist() == t
            assert int(meta.slot_mapping[i]) == t[pos // BS] * BS + pos % BS
            assert int(meta.context_lens[i]) == len(s.token_ids)
            assert int(buf.positions(rows)[i]) == pos and int(buf.input_ids(rows)[i]) == s.token_ids[-1]
        assert (meta.slot_mapping[n:] == -1).all() and (meta.context_lens[n:] == 0).all()
        assert meta.lora_slots.tolist() == [s.group.lora_slot for s in batch] + [-1] * (rows - n)
        assert meta.cu_seqlens_q.tolist() == list(range(rows + 1))
        samp = buf.sampling(rows)
        torch.testing.assert_close(samp["temperature"][:n], torch.tensor(temps))
        assert (samp["temperature"][n:] == 0).all() and (samp["top_p"][n:] == 1).all()
        torch.testing.assert_close(samp["weights"][:n], torch.tensor(weights))
        assert (samp["weights"][n:] == 0).all() and samp["weights"].is_contiguous()
    pending = [SimpleNamespace(token_ids=[PENDING], block_table=[0], num_pending=1,
                               group=SimpleNamespace(lora_slot=-1))]
    with pytest.raises(RuntimeError, match="no feed"):  # never a placeholder id read as a token
        buf.fill(pending, temperature=[1.0], top_k=[0], top_p=[1.0], min_p=[0.0], seeds=[0], offsets=[0],
                 weights=[[1.0, 1.0]], rows=1)


@torch.inference_mode()
def _step_on_rows(engine: LLMEngine, seqs: list, rows: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    runner, n = engine.runner, len(seqs)
    runner.buffers.fill(seqs, temperature=[0.0] * n, top_k=[0] * n, top_p=[1.0] * n, min_p=[0.0] * n,
                        seeds=[0] * n, offsets=[0] * n, weights=[[LAM]] * n, rows=rows)
    ids, logits = runner._decode_step(rows)
    return ids[:n].clone(), [t[:n].clone() for t in logits]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_step_equals_unpadded_and_writes_no_padding_slot(qwen2_triple: tuple, backend: str) -> None:
    """The exact function CUDA graphs capture, on a batch padded up to its bucket (triton: attention,
    layer ops with their KV-cache store, and sampler kernels in the interpreter)."""
    engine = make_engine(qwen2_triple, attention_backend=backend, layer_ops=backend, max_num_seqs=8)
    if backend == "triton":
        engine.runner.sampler = "triton"
    for i, p in enumerate(prompts(3)):
        engine.add_request(f"p{i}", p, GREEDY)
    engine.step()  # prefill; the three sequences now wait for their first decode step
    seqs = list(engine.scheduler.running)
    for s in seqs:
        engine.block_manager.append_slot(s)
    before = [[(k.clone(), v.clone()) for k, v in pool] for pool in engine.kv.pools]
    ids, logits = _step_on_rows(engine, seqs, len(seqs))
    after_unpadded = [[(k.clone(), v.clone()) for k, v in pool] for pool in engine.kv.pools]
    pids, plogits = _step_on_rows(engine, seqs, 8)
    assert ids.tolist() == pids.tolist()
    for a, b in zip(logits, plogits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    slots = {s.block_table[(len(s.token_ids) - 1) // BS] * BS + (len(s.token_ids) - 1) % BS for s in seqs}
    kv = engine.kv
    for pool0, pool1, pool2, copies in zip(before, after_unpadded, kv.pools, kv.copies):
        # a stacked pool holds each of its models' blocks, num_blocks apart
        own = {s + c * kv.num_blocks * BS for s in slots for c in range(copies)}
        for (k0, v0), (k1, v1), (k2, v2) in zip(pool0, pool1, pool2):
            changed = ((k0 != k1).flatten(2).any(-1) | (v0 != v1).flatten(2).any(-1)).flatten()
            assert set(changed.nonzero()[:, 0].tolist()) == own  # each step writes its own slots only
            torch.testing.assert_close(k2, k1, atol=1e-5, rtol=1e-5)  # padding wrote nothing more
            torch.testing.assert_close(v2, v1, atol=1e-5, rtol=1e-5)


def test_interpreted_triton_engine_equals_torch_engine(qwen2_triple: tuple) -> None:
    """The GPU configuration's kernels (triton attention, layer ops and sampler) through the whole
    engine, on CPU: prefill in chunks, prefix-cache hits (the second half repeats the first's prompts)
    and decode steps, all writing the KV cache through the fused rotary + store kernel."""
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    batch = prompts(3, seed=7)
    batch += [p + [5, 6, 7] for p in batch]
    ref = generate(make_engine(qwen2_triple, attention_backend="torch"), batch, params)
    tri = make_engine(qwen2_triple, attention_backend="triton", layer_ops="triton", max_num_batched_tokens=8)
    tri.runner.sampler = "triton"
    assert generate(tri, batch, params) == ref
    assert tri.block_manager.prefix_hits > 0
