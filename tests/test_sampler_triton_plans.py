"""The Triton sampler's launch plans: a row split into many vocabulary chunks, tiny blocks and the
narrowest histogram give the reference's probabilities and the default plan's tokens (interpreted on
the CPU, natively under `gpu`)."""
from __future__ import annotations

import pytest
import torch

import rast_kernels as rk
from rast_kernels import reference
from rast_kernels.batch import normalize
from test_sampler import DEVICES, _case


@pytest.mark.parametrize("where", DEVICES)
def test_triton_vocab_split_and_narrow_histogram(where: str) -> None:
    """Many chunks per row, tiny blocks and 4 buckets per pass (the most descent passes): the same
    probabilities as the reference and the same tokens as the default launch plan."""
    if "triton" not in rk.available_backends():
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    from rast_kernels import sampler_triton

    gen = torch.Generator().manual_seed(16)
    logits, deltas, kw = _case(gen, 2, 150, 2, where, levels=4)
    batch = normalize(logits, deltas, seed=torch.arange(2, device=where) + 5, offset=9, **kw)
    want = reference.probs(batch)
    for plan in (dict(block=16, chunk=48, nb=4), dict(block=32, chunk=32, nb=64)):
        torch.testing.assert_close(sampler_triton.probs(batch, **plan), want, rtol=1e-4, atol=1e-6)
        assert torch.equal(sampler_triton.sample(batch, **plan), sampler_triton.sample(batch))
