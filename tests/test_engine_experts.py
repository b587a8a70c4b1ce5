"""Several (R, S, λ) pairs summed, and per-request λ, end to end against HF transformers' Eq. 3 (the
oracles of test_engine)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from rast_engine import LLM
from rast_engine.errors import RastError
from rast_engine.sampling_params import SamplingParams
from test_engine import GREEDY, PROMPTS, hf_eq3, hf_greedy


def test_several_expert_pairs_sum_their_deltas(qwen2_triple: tuple) -> None:
    large, rl, base = map(str, qwen2_triple)
    llm = LLM(large, rl, base, lam=0.5, experts=[(base, rl, 0.2)], kv_cache_blocks=32)
    given = {1.0: "one number;", (1.0,): "1 value;", (1.0, 2.0, 3.0): "3 values;"}
    for lam, says in given.items():  # one number per pair, in the engine's order
        lam = list(lam) if isinstance(lam, tuple) else lam
        with pytest.raises(RastError, match=f"lam gives {says} this engine has 2 small pairs, so lam needs one number per pair"):
            llm.llm_engine.add_request("x", PROMPTS[0], SamplingParams(lam=lam))
    assert not llm.llm_engine.has_unfinished_requests()
    ids = llm.get_tokenizer().encode(PROMPTS[3])
    res = llm.score([ids], output="logits")[0]
    assert len(res.deltas) == 2
    # (rl - base) * 0.5 + (base - rl) * 0.2 = 0.3 (rl - base)
    torch.testing.assert_close(res.combined, hf_eq3(qwen2_triple, ids, 0.3, llm.llm_engine.vocab_size),
                               atol=1e-4, rtol=0)
    out = llm.generate([ids], GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(qwen2_triple, ids, 0.3, llm.llm_engine.vocab_size, GREEDY.max_tokens)
    # a request's λ per pair, beside one on the engine's: (rl - base) * 0.2 + (base - rl) * 0.9 = -0.7 (rl - base)
    per_pair = dataclasses.replace(GREEDY, lam=[0.2, 0.9])
    mine, engines = llm.generate([ids, ids], [per_pair, GREEDY], use_tqdm=False)
    assert mine.outputs[0].token_ids == hf_greedy(qwen2_triple, ids, -0.7, llm.llm_engine.vocab_size, GREEDY.max_tokens)
    assert engines.outputs[0].token_ids == out.outputs[0].token_ids
    assert mine.outputs[0].token_ids != out.outputs[0].token_ids  # the oracle tells the two apart


def test_request_lam_on_an_engine_without_small_models(qwen2_triple: tuple) -> None:
    llm = LLM(str(qwen2_triple[0]), kv_cache_blocks=16)
    with pytest.raises(RastError, match="has none"):
        llm.llm_engine.add_request("x", PROMPTS[0], SamplingParams(lam=0.5))
    assert not llm.llm_engine.has_unfinished_requests()
