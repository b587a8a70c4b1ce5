"""Tiny random HF model directories for tests, built offline.

A triple is (large, rl, base): one shared tokenizer, the large model's vocab width differs from the small
ones' (like Qwen2.5's 152064 vs 151936), both wider than the tokenizer. Weights come from transformers'
own model classes under a fixed torch seed, then biases and norm weights are perturbed away from HF's
zero/one init so a model that drops a bias or misreads a norm weight cannot pass the equality tests.
Init std is raised above HF's 0.02 so attention is peaked and rotary errors change the logits visibly.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM,
                          Olmo2Config, Olmo2ForCausalLM, Olmo3Config, Olmo3ForCausalLM, OlmoeConfig, OlmoeForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# mixtures of experts: (config class, model class, their own keys); the key naming the expert count
MOE = {"qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(norm_topk_prob=True)),
       "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM, dict(shared_expert_intermediate_size=48)),
       "mixtral": (MixtralConfig, MixtralForCausalLM, {}),
       "olmoe": (OlmoeConfig, OlmoeForCausalLM, {})}
MOE_COUNT = {"qwen3_moe": "num_experts", "qwen2_moe": "num_experts", "mixtral": "num_local_experts",
             "olmoe": "num_experts"}
OLMO3_WINDOW = 4
# YaRN on OLMo 3's full-attention layers, as its long-context checkpoints have it
OLMO3_YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256, "beta_fast": 32,
              "beta_slow": 1, "attention_factor": 1.2}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
TOKENIZER_VOCAB = 100  # trained size incl. special tokens; must stay below every model's vocab width
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}" + EOS + "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LLAMA3_SCALING = {  # small factors so the scaled band falls inside head_dim 16 at rope_theta 5e5
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

_ENGLISH = [
    "the cat sat on the mat and the dog sat on the log",
    "a small model can steer a large model when they read the same tokens",
    "what is the answer? let us think step by step.",
    "the answer is the sum of the two numbers, so we add them.",
    "hello world! this is a test of the tokenizer, nothing more.",
    "we solve the problem, then we check the result again.",
]


# a tokenizer corpus with JSON's characters, for structured outputs (tests/conftest.py: json_triple)
JSON_CORPUS = ('{"name": "cat", "age": 3, "ok": true}', '["a", "b", null, 1.5]', '{"x": [1, 2], "y": {"z": false}}',
               'a "b\\" é')


def _corpus() -> list[str]:
    lines = list(_ENGLISH)
    for a in range(0, 30, 3):
        for b in range(1, 20, 4):
            lines.append(f"{a} + {b} = {a + b}. {a} * {b} = {a * b}. {a + b} - {b} = {a}")
    return lines


def make_tokenizer(path: str | Path, extra_corpus: tuple[str, ...] = (), added_tokens: tuple[str, ...] = ()) -> Path:
    """Train a small byte-level BPE in memory and save it HF-style; ``added_tokens`` become single tokens
    that decode to their text (not special: as Qwen3's <think> and </think>).

    Byte-level like the real Qwen2.5 and Llama-3 tokenizers: transformers 5 rebuilds a qwen2 directory's
    tokenizer as Qwen2Tokenizer (byte-level, from vocab and merges) whatever tokenizer.json says, so any
    other scheme would not round-trip. The alphabet is only the corpus's bytes, to keep the vocab tiny.
    """
    path = Path(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=[PAD, BOS, EOS, UNK, *ROLE_TOKENS], show_progress=False
    )
    tok.train_from_iterator(_corpus() + list(extra_corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS,
    )
    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in added_tokens])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return path


def _perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 10_000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("gate.weight") and p.shape[0] > 1:  # a router (HF's starts at zero): no ties
                p.copy_(torch.randn(p.shape, generator=gen))


def make_model_dir(
    path: str | Path,
    arch: str = "qwen2",
    *,
    vocab_width: int = 112,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 64,
    seed: int = 0,
    tie: bool = True,
    rope_scaling: dict | None = None,
    rope_theta: float | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_size: str | int | None = None,
    max_position_embeddings: int = 512,
    dtype: torch.dtype = torch.float32,
    head_dim: int | None = None,
    sliding_window: int | None = None,
) -> Path:
    """Write config.json, safetensors weights (sharded if max_shard_size) and a tokenizer to ``path``.
    ``head_dim`` (Qwen3 only, which has its own): default hidden / heads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer_dir = make_tokenizer(path / "_tokenizer")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    if len(tokenizer) > vocab_width:
        raise ValueError(f"vocab_width {vocab_width} is smaller than the tokenizer ({len(tokenizer)})")
    common = dict(
        vocab_size=vocab_width, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
        max_position_embeddings=max_position_embeddings, initializer_range=0.15, rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "qwen2":  # rope_scaling: a copy, as for Llama below
        sliding = {} if sliding_window is None else dict(use_sliding_window=True, sliding_window=sliding_window,
                                                         max_window_layers=1)  # layers 1.. slide
        config = Qwen2Config(rope_theta=rope_theta or 1e6,
                             rope_scaling=None if rope_scaling is None else dict(rope_scaling), **sliding, **common)
        cls = Qwen2ForCausalLM
    elif arch == "qwen3":
        if rope_scaling is not None:
            raise ValueError("the Qwen3 factory does not take rope_scaling")
        config = Qwen3Config(rope_theta=rope_theta or 1e6, head_dim=head_dim or hidden // heads, **common)
        cls = Qwen3ForCausalLM
    elif arch == "mistral":  # a 5-token window in every layer
        config = MistralConfig(rope_theta=rope_theta or 1e6, sliding_window=5, **common)
        cls = MistralForCausalLM
    elif arch == "gemma3":  # windows of 4 in every other layer (the first full), linear rope scaling on the full
        kinds = ["full_attention" if i % 2 == 0 else "sliding_attention" for i in range(layers)]
        config = Gemma3TextConfig(rope_theta=rope_theta or 1e6, rope_local_base_freq=1e4, head_dim=16,
                                  rope_scaling={"rope_type": "linear", "factor": 2.0}, sliding_window=4,
                                  layer_types=kinds, query_pre_attn_scalar=24, **common)
        cls = Gemma3ForCausalLM
    elif arch == "gemma2":  # windows of 4 in every other layer (the first sliding), both soft caps
        config = Gemma2Config(rope_theta=rope_theta or 1e4, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                              final_logit_softcapping=3.0, attn_logit_softcapping=2.0, **common)
        cls = Gemma2ForCausalLM
    elif arch == "llama":
        # a copy: LlamaConfig writes rope_theta into the dict it is given
        scaling = None if rope_scaling is None else dict(rope_scaling)
        config = LlamaConfig(rope_theta=rope_theta or 5e5, rope_scaling=scaling, **common)
        cls = LlamaForCausalLM
    elif arch == "olmo2":
        if rope_scaling is not None:
            raise ValueError("the OLMo 2 factory does not take rope_scaling")
        config = Olmo2Config(rope_theta=rope_theta or 5e5, **common)
        cls = Olmo2ForCausalLM
    elif arch == "olmo3":  # a 4-token window in every other layer, the first sliding; rope_scaling: full layers'
        kinds = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        config = Olmo3Config(rope_theta=rope_theta or 5e5, sliding_window=OLMO3_WINDOW, layer_types=kinds,
                             rope_scaling=None if rope_scaling is None else dict(rope_scaling), **common)
        cls = Olmo3ForCausalLM
    elif arch in MOE:
        config_class, cls, extra = MOE[arch]
        # four experts, two a token; Qwen's second layer dense, so both block kinds run
        dense = dict(mlp_only_layers=[1], moe_intermediate_size=intermediate // 2) if arch.startswith("qwen") else {}
        config = config_class(rope_theta=rope_theta or 1e6, num_experts_per_tok=2, **{MOE_COUNT[arch]: 4},
                              **dense, **extra, **common)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    if sliding_window is not None and arch != "qwen2":
        raise ValueError("sliding_window is the Qwen2 factory's (OLMo 3 has its own)")
    if head_dim is not None and arch != "qwen3":
        raise ValueError(f"head_dim is hidden / heads for {arch} (16 for gemma3)")
    torch.manual_seed(seed)
    model = cls(config).eval()
    _perturb(model, seed)
    model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **kwargs)
    tokenizer.save_pretrained(str(path))
    if (path / "_tokenizer").exists():
        shutil.rmtree(path / "_tokenizer")
    return path


def make_triple(root: str | Path, arch: str = "qwen2", extra_corpus: tuple[str, ...] = (),
                added_tokens: tuple[str, ...] = ()) -> tuple[Path, Path, Path]:
    """(large_dir, rl_dir, base_dir): large untied at width 128, small tied at width 112, one tokenizer
    (trained on extra_corpus too, e.g. for characters the default corpus lacks). Qwen3 heads are 32 wide
    in the large model and 16 in the small ones (not hidden / heads)."""
    root = Path(root)
    tok_dir = make_tokenizer(root / "tokenizer", extra_corpus, added_tokens)
    scaling = LLAMA3_SCALING if arch == "llama" else None
    large = make_model_dir(
        root / "large", arch, vocab_width=128, hidden=64, layers=3, heads=4, kv_heads=2, intermediate=128,
        seed=1, tie=False, rope_scaling=scaling, tokenizer_dir=tok_dir, head_dim=32 if arch == "qwen3" else None,
    )
    small = dict(vocab_width=112, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, tie=True,
                 rope_scaling=scaling, tokenizer_dir=tok_dir, head_dim=16 if arch == "qwen3" else None)
    rl = make_model_dir(root / "rl", arch, seed=2, **small)
    base = make_model_dir(root / "base", arch, seed=3, **small)
    return large, rl, base
