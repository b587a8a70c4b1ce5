"""Model shapes of the toy world. Both are Qwen2 (q/k/v bias, GQA, RoPE, untied head). The embedding
widths are padded past the 18-token vocabulary — to 32 for the small pair, to 64 for the large one — so
the shipped triple exercises the different-vocab-width handling that Qwen2.5 sizes need."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rast_engine.toy.tokenizer import vocab_size


@dataclass(frozen=True)
class ToyShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab_width: int

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads}/{self.kv_heads} do not divide hidden {self.hidden}")
        if self.vocab_width < vocab_size():
            raise ValueError(f"vocab width {self.vocab_width} < tokenizer size {vocab_size()}")


SMALL = ToyShape(hidden=128, intermediate=384, layers=4, heads=4, kv_heads=2, vocab_width=32)
LARGE = ToyShape(hidden=256, intermediate=896, layers=6, heads=8, kv_heads=2, vocab_width=64)


def build_model(shape: ToyShape, seed: int) -> Qwen2ForCausalLM:
    from rast_engine.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    config = Qwen2Config(
        vocab_size=shape.vocab_width,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
