"""Small models stacked into one forward (rast_engine.models.stacked: an (rl, base) pair, or three models
of two experts sharing a base) against the models run separately, the oracle (each CausalLM is checked
against HF's forward in test_models.py): the same logits at every step of a chunked prefill over a cached
prefix and of decode steps, and the same K/V in each part of the shared pool as in each model's own
cache. Also the pool's copy-on-write, models that cannot stack, and whole engines against HF and
against the unstacked engine.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from factories import make_model_dir, make_tokenizer
from rast_engine.attention.metadata import AttentionMetadata
from rast_engine.attention.torch_backend import TorchAttention
from rast_engine.attention.triton_backend import TritonAttention
from rast_engine.kv_cache import KVCache
from rast_engine.models import CausalLM, load_model
from rast_engine.models.layer_ops import get_layer_ops
from rast_engine.models.stacked import StackedCausalLM, forward_units, stacked_metadata, stacking_obstacle
from rast_kernels.launch import interpreting

BLOCK, NUM_BLOCKS = 4, 9
SMALL = dict(vocab_width=112, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _models(root: Path, tok: Path, arch: str, tie: bool, ops: str, n: int = 2, **shape: int) -> list[CausalLM]:
    """n small models of one architecture with different weights, sharing one attention backend."""
    backend = TritonAttention() if ops == "triton" else TorchAttention()
    dirs = [make_model_dir(root / f"m{seed}", arch, seed=seed, tie=tie, tokenizer_dir=tok, **{**SMALL, **shape})
            for seed in range(2, 2 + n)]
    return [load_model(str(d), device="cpu", dtype=torch.float32, attention=backend, ops=get_layer_ops(ops, "cpu"))
            for d in dirs]


def _meta(chunks: list[tuple[int, int]], tables: list[list[int]], is_prefill: bool
          ) -> tuple[AttentionMetadata, torch.Tensor]:
    positions = [p for start, n in chunks for p in range(start, start + n)]
    owner = [b for b, (_, n) in enumerate(chunks) for _ in range(n)]
    cu = torch.tensor([0] + [n for _, n in chunks]).cumsum(0).to(torch.int32)
    meta = AttentionMetadata(
        is_prefill=is_prefill,
        slot_mapping=torch.tensor([tables[b][p // BLOCK] * BLOCK + p % BLOCK for b, p in zip(owner, positions)]),
        block_tables=torch.tensor(tables, dtype=torch.int32), cu_seqlens_q=cu,
        context_lens=torch.tensor([s + n for s, n in chunks], dtype=torch.int32),
        max_seqlen_q=max(n for _, n in chunks), max_seqlen_k=max(s + n for s, n in chunks), block_size=BLOCK)
    return meta, torch.tensor(positions)


CASES = [("qwen2", True, "torch", 2), ("llama", False, "torch", 2), ("qwen2", True, "torch", 3),
         ("qwen3", False, "torch", 3), ("olmo2", True, "torch", 2), ("olmo3", True, "torch", 2),
         ("gemma3", True, "torch", 2), ("gemma2", False, "torch", 2), ("qwen3_moe", False, "torch", 3),
         ("qwen2_moe", True, "torch", 2), ("mixtral", False, "torch", 2), ("olmoe", True, "torch", 2)]
if interpreting():
    CASES += [("qwen2", False, "triton", 3), ("qwen3", True, "triton", 2), ("olmo2", False, "triton", 3),
              ("olmo3", False, "triton", 2), ("gemma3", True, "triton", 2), ("gemma2", True, "triton", 2),
              ("qwen3_moe", True, "triton", 3), ("qwen2_moe", False, "triton", 2)]


@pytest.mark.parametrize("arch,tie,ops,n", CASES)
def test_stacked_forward_equals_the_models_run_alone(tmp_path: Path, tok_dir: Path, arch: str, tie: bool, ops: str,
                                                     n: int) -> None:
    models = _models(tmp_path, tok_dir, arch, tie, ops, n, **({"head_dim": 16} if arch == "qwen3" else {}))
    stacked = StackedCausalLM(models)  # from here the models' weights are views of its
    cfg = models[0].config
    kv = KVCache([cfg] * (n + 1), NUM_BLOCKS, BLOCK, torch.float32, torch.device("cpu"), copies=[1] * n + [n])
    own, pool = kv.pools[:n], kv.pools[n]
    seqs = [[5, 9, 2, 7, 7, 1, 3, 8, 4, 6, 2], [11, 4, 4, 9, 10, 2, 5, 6, 1]]
    tables = [[6, 1, 4], [0, 8, 3]]
    done = [0, 0]
    for sizes, is_prefill in (([5, 2], True), ([4, 5], True), ([1, 1], False), ([1, 1], False)):
        meta, positions = _meta([(done[b], n) for b, n in enumerate(sizes)], tables, is_prefill)
        ids = torch.tensor([t for b, n in enumerate(sizes) for t in seqs[b][done[b]:done[b] + n]])
        with torch.no_grad():
            want = [m.compute_logits(m(ids, positions, meta, p)) for m, p in zip(models, own)]
            got = stacked.compute_logits(stacked(ids, positions, meta, pool))
        assert len(got) == n
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        done = [d + n for d, n in zip(done, sizes)]
    for layer, (k_all, v_all) in enumerate(pool):  # each part of the shared pool is its model's cache
        for c, model_pool in enumerate(own):
            torch.testing.assert_close(k_all[c * NUM_BLOCKS:(c + 1) * NUM_BLOCKS], model_pool[layer][0])
            torch.testing.assert_close(v_all[c * NUM_BLOCKS:(c + 1) * NUM_BLOCKS], model_pool[layer][1])


def test_stacking_shares_storage_and_outputs_into_given_buffers(tmp_path: Path, tok_dir: Path) -> None:
    rl, base = _models(tmp_path, tok_dir, "qwen2", True, "torch")
    stacked = StackedCausalLM([rl, base])
    assert rl.layers[1].mlp.down_proj.weight.data_ptr() == stacked.layers[1].mlp.down_proj.weight[0].data_ptr()
    assert base.embed_tokens.weight.data_ptr() == stacked.embed[1].data_ptr()
    assert base.lm_head.weight is base.embed_tokens.weight  # tied: still one tensor
    hidden = torch.randn(2, 3, rl.config.hidden_size)
    outs = [torch.empty(3, rl.config.vocab_size), torch.empty(3, rl.config.vocab_size)]
    got = stacked.compute_logits(hidden, outs)
    assert got[0] is outs[0] and got[1] is outs[1]
    torch.testing.assert_close(outs[1], base.compute_logits(hidden[1]))


def test_stacked_metadata_offsets_every_further_copy() -> None:
    meta, _ = _meta([(4, 2), (0, 1)], [[2, 5], [7, 0]], True)
    meta.slot_mapping[1] = -1  # a padding slot stays a padding slot in both copies
    two = stacked_metadata(meta, NUM_BLOCKS, 2)
    off = NUM_BLOCKS * BLOCK
    assert two.slot_mapping.tolist() == [20, -1, 28, 20 + off, -1, 28 + off]
    assert two.block_tables.tolist() == [[2, 5], [7, 0], [2 + NUM_BLOCKS, 5 + NUM_BLOCKS], [7 + NUM_BLOCKS, NUM_BLOCKS]]
    assert two.context_lens.tolist() == [6, 1, 6, 1] and two.cu_seqlens_q.tolist() == [0, 2, 3, 5, 6]
    assert (two.max_seqlen_q, two.max_seqlen_k, two.is_prefill) == (2, 6, True)
    three = stacked_metadata(meta, NUM_BLOCKS, 3)
    assert three.slot_mapping.tolist() == [20, -1, 28, 20 + off, -1, 28 + off, 20 + 2 * off, -1, 28 + 2 * off]
    assert three.block_tables[4:].tolist() == [[2 + 2 * NUM_BLOCKS, 5 + 2 * NUM_BLOCKS], [7 + 2 * NUM_BLOCKS,
                                                                                          2 * NUM_BLOCKS]]
    assert three.context_lens.tolist() == [6, 1] * 3 and three.cu_seqlens_q.tolist() == [0, 2, 3, 5, 6, 8, 9]


def test_copy_on_write_copies_every_models_block() -> None:
    from rast_engine.models.config import ModelConfig

    cfg = ModelConfig(arch="qwen2", hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=4, vocab_size=10, rms_norm_eps=1e-6, rope_theta=1e4,
                      rope_scaling=None, tie_word_embeddings=True, attention_bias=True, o_proj_bias=False,
                      max_position_embeddings=64, torch_dtype=torch.float32)
    kv = KVCache([cfg, cfg], 5, 2, torch.float32, torch.device("cpu"), copies=[1, 2])
    assert kv.bytes == 5 * 2 * 3 * cfg.kv_bytes_per_token(torch.float32)  # three models' blocks
    for pool in kv.pools:
        for k, v in pool:
            k.copy_(torch.randn(k.shape))
            v.copy_(torch.randn(v.shape))
    before = [[(k.clone(), v.clone()) for k, v in pool] for pool in kv.pools]
    kv.copy_blocks([(1, 3)])
    k1, k2 = kv.pools[0][0][0], kv.pools[1][0][0]
    assert torch.equal(k1[3], before[0][0][0][1])
    assert torch.equal(k2[3], before[1][0][0][1]) and torch.equal(k2[5 + 3], before[1][0][0][5 + 1])
    untouched = [b for b in range(10) if b not in (3, 8)]
    assert torch.equal(k2[untouched], before[1][0][0][untouched])
    assert torch.equal(kv.pools[1][0][1][8], before[1][0][1][6])


def test_forward_units_stack_distinct_small_models_of_one_architecture(tmp_path: Path, tok_dir: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    large, rl, base = _models(tmp_path / "a", tok_dir, "qwen2", True, "torch", 3)
    [deeper] = _models(tmp_path / "b", tok_dir, "qwen2", True, "torch", 1, layers=3)
    assert "num_layers" in stacking_obstacle(rl, deeper)
    with pytest.raises(ValueError, match="cannot stack"):
        StackedCausalLM([rl, deeper])
    with pytest.raises(ValueError, match="two distinct"):
        StackedCausalLM([rl, rl])
    # two experts sharing their base (one object in two roles): three distinct small models, one forward
    units, roles = forward_units([large, rl, base, deeper, base], stack=True)
    assert units[0] is large and isinstance(units[1], StackedCausalLM) and units[1].copies == 2
    assert units[2] is deeper and roles == [0, 1, 2, 3, 2]
    units, roles = forward_units([large, rl, base, deeper, base], stack=False)
    assert units == [large, rl, base, deeper] and roles == [0, 1, 2, 3, 2]
    with caplog.at_level(logging.INFO, logger="rast"):
        forward_units([large, rl, deeper], stack=True)
    assert "small models run as 2 forwards: their configs differ in num_layers" in caplog.text


def test_experts_sharing_their_base_run_it_once_and_match_hf(qwen2_triple: tuple, tmp_path: Path) -> None:
    """experts (rl, base) and (rl2, base): the base loads once and the three small models run as one
    stacked forward; score() equals Eq. 3 summed over both pairs from HF forwards."""
    from transformers import AutoModelForCausalLM

    from rast_engine import LLM

    large, rl, base = map(str, qwen2_triple)
    rl2 = make_model_dir(tmp_path / "rl2", seed=9, tokenizer_dir=Path(large), **SMALL)
    llm = LLM(large, rl, base, lam=0.5, experts=[(str(rl2), base, -0.3)], kv_cache_blocks=32, block_size=4)
    engine = llm.llm_engine
    assert engine.model_set.models[2] is engine.model_set.models[4]  # the shared base, loaded once
    assert [u.copies for u in engine.runner.units] == [1, 3] and len(engine.kv.pools) == 2
    ids = llm.get_tokenizer().encode("a small model can steer a large")
    got = llm.score([ids], output="logits")[0].combined
    v = engine.vocab_size
    with torch.no_grad():
        hf = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)(torch.tensor([ids])).logits[0, :, :v]
              for p in (large, rl, base, str(rl2))]
    torch.testing.assert_close(got, hf[0] + 0.5 * (hf[1] - hf[2]) - 0.3 * (hf[3] - hf[2]), atol=1e-4, rtol=0)


def test_engine_decodes_the_same_with_and_without_stacking(qwen2_triple: tuple) -> None:
    """Greedy and seeded sampling, forks (n = 2: copy-on-write of shared blocks) and a prompt that hits
    the prefix cache give the same tokens, with the same logprobs, whether the pair runs as one forward
    or as two."""
    from rast_engine import LLM, SamplingParams

    large, rl, base = map(str, qwen2_triple)
    prompt = "what is the answer? let us think"
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.9, n=2, seed=3, max_tokens=8, ignore_eos=True, logprobs=0)]
    tokens, logprobs = {}, {}
    for stack in (True, False):
        llm = LLM(large, rl, base, lam=0.7, block_size=4, kv_cache_blocks=64, stack_small_models=stack)
        kinds = [type(u).__name__ for u in llm.llm_engine.runner.units]
        assert kinds == (["CausalLM", "StackedCausalLM"] if stack else ["CausalLM"] * 3)
        first = llm.generate([prompt, prompt + " again"], params, use_tqdm=False)
        again = llm.generate([prompt + " step by step"], params[0], use_tqdm=False)  # prefix-cache hits
        assert llm.llm_engine.block_manager.prefix_hits > 0
        tokens[stack] = [[c.token_ids for c in o.outputs] for o in first + again]
        logprobs[stack] = torch.tensor([c.cumulative_logprob for c in first[1].outputs])
    assert tokens[True] == tokens[False]
    assert len(logprobs[True]) == 2  # both forks
    torch.testing.assert_close(logprobs[True], logprobs[False], rtol=0, atol=1e-4)
