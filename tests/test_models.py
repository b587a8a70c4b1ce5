"""The plain-PyTorch decoder over the paged cache equals HF transformers' forward (the oracle).

Each case runs two sequences of different lengths in one batch with block_size 4 and shuffled block
tables: a prefill (optionally in two chunks, the second over a cached prefix), then single-token decode
steps, and compares every position's logits with HF's forward over the whole sequence.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from factories import LLAMA3_SCALING, OLMO3_YARN, make_model_dir, make_tokenizer
from rast_engine.attention.metadata import AttentionMetadata
from rast_engine.attention.torch_backend import TorchAttention, store_kv
from rast_engine.errors import ModelLoadError
from rast_engine.models import CausalLM, ModelConfig, load_model
from rast_engine.models.layer_ops import get_layer_ops

BLOCK = 4
ATOL = 1e-4


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


MODEL_CASES = {
    "qwen2_tied": dict(arch="qwen2", tie=True),
    "qwen2_untied": dict(arch="qwen2", tie=False, heads=4, kv_heads=1),
    "llama_llama3": dict(arch="llama", tie=False, hidden=64, rope_scaling=LLAMA3_SCALING),
    # a head_dim of its own (16, not 32 / 4) and kv heads shared by two query heads
    "qwen3": dict(arch="qwen3", tie=False, head_dim=16),
    # q/k norms over all heads, post-norm sublayers; kv heads shared by two query heads
    "olmo2": dict(arch="olmo2", tie=False),
    # a 4-token sliding window in layers 0 and 2 (shorter than every test sequence), yarn on layer 1 only
    "olmo3": dict(arch="olmo3", tie=False, layers=3, rope_scaling=OLMO3_YARN),
    # use_sliding_window: layers from max_window_layers (1) on see 5 tokens
    "qwen2_sliding": dict(arch="qwen2", tie=True, layers=3, sliding_window=5),
    "mistral": dict(arch="mistral", tie=False),
    # sandwich norms scaling by 1 + weight, GELU, scaled embeddings and attention, windows with their own rope
    "gemma3": dict(arch="gemma3", tie=True, layers=3),
    # caps small enough to bend the scores and logits of these random weights
    "gemma2": dict(arch="gemma2", tie=False, layers=3),
    # mixtures of four experts, two a token (tests/factories.py MOE): Qwen3's renormalised top-k, with a
    # dense second layer; Qwen2's shared expert; Mixtral's float32 router weights; OLMoE's q/k norms
    "qwen3_moe": dict(arch="qwen3_moe", tie=False, layers=3), "qwen2_moe": dict(arch="qwen2_moe", tie=False, layers=3),
    "mixtral": dict(arch="mixtral", tie=False), "olmoe": dict(arch="olmoe", tie=True),
}


@pytest.fixture(scope="module", params=sorted(MODEL_CASES))
def model_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tok_dir: Path
) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    return make_model_dir(path, seed=7, tokenizer_dir=tok_dir, **MODEL_CASES[request.param])


def hf_logits(path: Path, tokens: list[int]) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0]


def make_meta(chunks: list[tuple[int, int]], tables: list[list[int]], is_prefill: bool
              ) -> tuple[AttentionMetadata, torch.Tensor]:
    """chunks[b] = (first new position, new tokens) -> metadata and the flat positions."""
    positions = [p for start, n in chunks for p in range(start, start + n)]
    owner = [b for b, (_, n) in enumerate(chunks) for _ in range(n)]
    slots = [tables[b][p // BLOCK] * BLOCK + p % BLOCK for b, p in zip(owner, positions)]
    width = max(len(t) for t in tables)
    cu = [0]
    for _, n in chunks:
        cu.append(cu[-1] + n)
    meta = AttentionMetadata(
        is_prefill=is_prefill,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        context_lens=torch.tensor([s + n for s, n in chunks], dtype=torch.int32),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        max_seqlen_q=max(n for _, n in chunks),
        max_seqlen_k=max(s + n for s, n in chunks),
        block_size=BLOCK,
    )
    return meta, torch.tensor(positions, dtype=torch.int64)


def run_paged(
    model: CausalLM, seqs: list[list[int]], prefill_splits: list[list[int]]
) -> list[torch.Tensor]:
    """Prefill each sequence in the given chunk sizes (all sequences step together), then decode the
    rest one token per step; returns every position's logits per sequence."""
    cfg = model.config
    blocks_needed = [-(-len(s) // BLOCK) for s in seqs]
    order = torch.randperm(sum(blocks_needed) + 3, generator=torch.Generator().manual_seed(0)).tolist()
    tables, at = [], 0
    for n in blocks_needed:
        tables.append(order[at:at + n])
        at += n
    shape = cfg.kv_cache_shape(len(order), BLOCK)
    caches = [(torch.zeros(shape, dtype=model.dtype), torch.zeros(shape, dtype=model.dtype))
              for _ in range(cfg.num_layers)]
    done = [0] * len(seqs)
    logits: list[list[torch.Tensor]] = [[] for _ in seqs]

    def step(sizes: list[int], is_prefill: bool) -> None:
        meta, positions = make_meta([(done[b], n) for b, n in enumerate(sizes)], tables, is_prefill)
        ids = torch.tensor([t for b, n in enumerate(sizes) for t in seqs[b][done[b]:done[b] + n]])
        with torch.no_grad():
            out = model.compute_logits(model(ids, positions, meta, caches))
        for b, chunk in enumerate(out.split(sizes)):
            logits[b].append(chunk)
            done[b] += sizes[b]

    for sizes in zip(*prefill_splits):
        step(list(sizes), is_prefill=True)
    while any(d < len(s) for d, s in zip(done, seqs)):
        assert all(len(s) - d == len(seqs[0]) - done[0] for d, s in zip(done, seqs))
        step([1] * len(seqs), is_prefill=False)
    return [torch.cat(rows) for rows in logits]


@pytest.mark.parametrize("ops", ["torch", "triton"])
@pytest.mark.parametrize("splits", [[[9], [6]], [[5, 4], [2, 4]]], ids=["prefill", "cached_prefix"])
def test_paged_forward_matches_hf(model_dir: Path, splits: list[list[int]], ops: str) -> None:
    """Both LayerOps backends (the fused Triton kernels run in the interpreter here)."""
    model = load_model(model_dir, device="cpu", dtype="float32", attention=TorchAttention(),
                       ops=get_layer_ops(ops, "cpu"))
    gen = torch.Generator().manual_seed(1)
    decode_steps = 4
    seqs = [torch.randint(0, 100, (sum(s) + decode_steps,), generator=gen).tolist() for s in splits]
    got = run_paged(model, seqs, splits)
    for seq, logits in zip(seqs, got):
        want = hf_logits(model_dir, seq)
        assert logits.shape == want.shape
        torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)


def test_llama3_scaling_changes_logits(tmp_path: Path, tok_dir: Path) -> None:
    """The tiny llama3 factors must matter at test lengths, or the equality test would not cover them."""
    scaled = make_model_dir(
        tmp_path / "s", "llama", hidden=64, rope_scaling=LLAMA3_SCALING, tokenizer_dir=tok_dir
    )
    plain = make_model_dir(tmp_path / "p", "llama", hidden=64, tokenizer_dir=tok_dir)
    tokens = list(range(3, 23))
    assert (hf_logits(scaled, tokens) - hf_logits(plain, tokens)).abs().max() > 1e-2


def test_sharded_checkpoint_loads_identically(tmp_path: Path, tok_dir: Path) -> None:
    kw = dict(arch="qwen2", tie=False, seed=3, tokenizer_dir=tok_dir)
    single = make_model_dir(tmp_path / "single", **kw)
    sharded = make_model_dir(tmp_path / "sharded", max_shard_size="20KB", **kw)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a = load_model(single, device="cpu", dtype="auto", attention=TorchAttention())
    b = load_model(sharded, device="cpu", dtype="auto", attention=TorchAttention())
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_dtype_auto_and_override(model_dir: Path) -> None:
    auto = load_model(model_dir, device="cpu", dtype="auto", attention=TorchAttention())
    assert auto.lm_head.weight.dtype == torch.float32
    m = load_model(model_dir, device="cpu", dtype="bfloat16", attention=TorchAttention())
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.rotary.cos_sin.dtype == torch.bfloat16


def test_tied_embeddings_share_storage(tmp_path: Path, tok_dir: Path) -> None:
    path = make_model_dir(tmp_path / "m", "qwen2", tie=True, tokenizer_dir=tok_dir)
    m = load_model(path, device="cpu", dtype="auto", attention=TorchAttention())
    assert m.lm_head.weight.data_ptr() == m.embed_tokens.weight.data_ptr()


def test_store_kv_skips_padding_slots() -> None:
    k_cache, v_cache = torch.zeros(3, BLOCK, 2, 8), torch.zeros(3, BLOCK, 2, 8)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    store_kv(k, v, k_cache, v_cache, torch.tensor([5, -1, 10]))
    flat_k, flat_v = k_cache.view(-1, 2, 8), v_cache.view(-1, 2, 8)
    assert torch.equal(flat_k[5], k[0]) and torch.equal(flat_k[10], k[2])
    assert torch.equal(flat_v[5], v[0]) and torch.equal(flat_v[10], v[2])
    assert flat_k.abs().sum(dim=(1, 2)).nonzero().flatten().tolist() == [5, 10]


# ---- clear load errors ----

def test_error_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope", device="cpu", dtype="auto", attention=TorchAttention())


def test_error_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path, device="cpu", dtype="auto", attention=TorchAttention())


@pytest.fixture
def copy_dir(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "copy"))


def test_error_no_safetensors(copy_dir: Path) -> None:
    for f in copy_dir.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors.*pickle"):
        load_model(copy_dir, device="cpu", dtype="auto", attention=TorchAttention())


def _rewrite(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_error_missing_tensor_is_named(copy_dir: Path) -> None:  # a dense layer's up projection, or an expert's
    name = max(n for n in load_file(str(copy_dir / "model.safetensors"))
               if n.startswith("model.layers.1.") and ("up_proj" in n or ".w3." in n))  # Mixtral's up: w3
    _rewrite(copy_dir, lambda t: t.pop(name))
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load_model(copy_dir, device="cpu", dtype="auto", attention=TorchAttention())


def test_error_shape_mismatch_names_both_shapes(copy_dir: Path) -> None:
    def shrink(t: dict[str, torch.Tensor]) -> None:
        name = "model.layers.0.self_attn.k_proj.weight"
        t[name] = t[name][:-1].clone()
    _rewrite(copy_dir, shrink)
    cfg = json.loads((copy_dir / "config.json").read_text())
    hidden = cfg["hidden_size"]
    kv = cfg["num_key_value_heads"] * (cfg.get("head_dim") or hidden // cfg["num_attention_heads"])
    expected = rf"k_proj\.weight has shape \[{kv - 1}, {hidden}\], expected \[{kv}, {hidden}\]"
    with pytest.raises(ModelLoadError, match=expected):
        load_model(copy_dir, device="cpu", dtype="auto", attention=TorchAttention())


def test_error_unsupported_config(copy_dir: Path) -> None:
    cfg = json.loads((copy_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    (copy_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="yarn"):
        ModelConfig.from_dir(copy_dir)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "olmo2", "olmo3", "gemma3", "gemma2", "qwen3_moe",
                                  "mixtral"])
def test_factory_triples(arch: str, request: pytest.FixtureRequest) -> None:
    """The shared triples: one tokenizer, large width != small width, both >= len(tokenizer)."""
    from transformers import AutoTokenizer

    large, rl, base = request.getfixturevalue(f"{arch}_triple")
    cfgs = [ModelConfig.from_dir(p) for p in (large, rl, base)]
    tokenizers = [AutoTokenizer.from_pretrained(str(p)) for p in (large, rl, base)]
    assert all(t.get_vocab() == tokenizers[0].get_vocab() for t in tokenizers)
    n = len(tokenizers[0])
    assert cfgs[0].vocab_size != cfgs[1].vocab_size == cfgs[2].vocab_size
    assert min(c.vocab_size for c in cfgs) >= n
    assert not cfgs[0].tie_word_embeddings and cfgs[1].tie_word_embeddings
    assert all((c.rope_scaling is not None) == (arch in ("llama", "gemma3")) for c in cfgs)  # gemma: its own linear
    assert all(c.qk_norm == (arch in ("qwen3", "gemma3", "qwen3_moe")) and
               c.qk_norm_full == c.post_norm == arch.startswith("olmo") for c in cfgs)
    assert all((c.num_experts, c.experts_per_token) == ((4, 2) if arch in ("qwen3_moe", "mixtral") else (0, 0))
               for c in cfgs)
    assert all(bool(c.layer_windows) == (arch in ("olmo3", "gemma3", "gemma2")) and
               c.sandwich_norm == arch.startswith("gemma") and (c.logit_softcap is not None) == (arch == "gemma2")
               for c in cfgs)
    if arch == "qwen3":  # head widths of their own, so a model reading hidden / heads fails
        assert [c.head_dim for c in cfgs] == [32, 16, 16] and cfgs[0].hidden_size // cfgs[0].num_heads == 16
    text = "what is 12 + 7? the answer is 19."
    assert tokenizers[0].decode(tokenizers[0](text)["input_ids"]) == text


def test_a_multimodal_gemma3_checkpoint_loads_its_language_model(tmp_path: Path, tok_dir: Path) -> None:
    """gemma-3-4b-pt and larger: config text_config, tensors under language_model.model. (transformers 4)
    or model.language_model. (5), beside a vision tower's, which is not read; the language model must give
    the text-only checkpoint's logits."""
    from safetensors.torch import load_file, save_file

    text = make_model_dir(tmp_path / "text", seed=9, tokenizer_dir=tok_dir, **MODEL_CASES["gemma3"])
    tokens = [3, 17, 8, 40, 2, 11, 5, 29, 7]
    want = run_paged(load_model(text, device="cpu", dtype="float32", attention=TorchAttention()), [tokens], [[9]])
    tensors = load_file(str(text / "model.safetensors"))
    for prefix in ("language_model.model.", "model.language_model."):
        multi = tmp_path / prefix.replace(".", "_")
        multi.mkdir()
        renamed = {prefix + k.removeprefix("model."): v for k, v in tensors.items()}
        renamed["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(4, 3, 2, 2)
        save_file(renamed, str(multi / "model.safetensors"))
        cfg = json.loads((text / "config.json").read_text())
        (multi / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": cfg,
                                                       "vision_config": {"model_type": "siglip_vision_model"}}))
        got = run_paged(load_model(multi, device="cpu", dtype="float32", attention=TorchAttention()), [tokens], [[9]])
        torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
