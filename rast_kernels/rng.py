"""Counter-based randomness shared by every sampler backend (torch, Triton, native C++).

The Gumbel noise of token ``i`` in a row depends only on ``(seed, offset, i)``: never on the row's
position in the batch, on other rows, or on any global generator. That is what makes sampling batch
invariant, reproducible across runs, free of host synchronisation and CUDA-graph safe.

The recipe is written with 32-bit unsigned arithmetic only (wrapping multiply, xor, shifts), so the
torch, Triton and C++ implementations produce bit-identical uniforms:

    mix(x)          = lowbias32: x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
    row_key(s, o)   : s, o taken modulo 2**64 (two's complement for negative ints), split in lo/hi words
                      k = mix(s_lo ^ 0x9E3779B9); k = mix(k ^ s_hi); k = mix(k ^ o_lo); k = mix(k ^ o_hi)
    bits(k, i)      = mix(mix(i ^ k) + k)                     # + wraps modulo 2**32
    uniform(k, i)   = ((bits >> 9) + 0.5) * 2**-23            # exactly representable, in (0, 1)
    gumbel(k, i)    = -log(-log(uniform(k, i)))               # float32

The second ``+ k`` keeps rows whose keys differ by an xor mask from sharing noise on permuted tokens.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
MIX_MUL1 = 0x7FEB352D
MIX_MUL2 = 0x846CA68B
# 23 bits plus the half step fit float32's 24-bit significand, so u never rounds to 0 or 1.
UNIFORM_SHIFT = 9
UNIFORM_SCALE = 2.0**-23


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2**32). Products wrap modulo 2**64, and only
    the low 32 bits are kept, so the result equals the uint32 computation."""
    x = x ^ (x >> 16)
    x = (x * MIX_MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_MUL2) & MASK32
    return x ^ (x >> 16)


def row_key(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """[B] int64 seeds and offsets -> [B] int64 keys in [0, 2**32)."""
    seed = seed.to(torch.int64)
    offset = offset.to(torch.int64)
    k = mix32((seed & MASK32) ^ GOLDEN)
    k = mix32(k ^ ((seed >> 32) & MASK32))
    k = mix32(k ^ (offset & MASK32))
    return mix32(k ^ ((offset >> 32) & MASK32))


def token_uniform(key: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B] keys -> [B, vocab] float32 uniforms in (0, 1)."""
    i = torch.arange(vocab, device=key.device, dtype=torch.int64)[None, :]
    k = key.to(torch.int64)[:, None]
    bits = mix32((mix32(i ^ k) + k) & MASK32)
    return ((bits >> UNIFORM_SHIFT).to(torch.float32) + 0.5) * UNIFORM_SCALE


def token_gumbel(key: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B] keys -> [B, vocab] float32 standard Gumbel noise."""
    return -torch.log(-torch.log(token_uniform(key, vocab)))
