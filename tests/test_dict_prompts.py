"""vLLM's dict prompts (TextPrompt {"prompt": text}, TokensPrompt {"prompt_token_ids": ids}) through
LLM.generate and LLMEngine.add_request: the same tokens as the text or ids they hold, the text kept on
the output; a cache_salt keeps the prompt's prefix-cache blocks to its own salt; any other field refused
before the engine changes state."""
from __future__ import annotations

import pytest

from rast_engine import LLM, SamplingParams
from rast_engine.errors import RastError

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def test_dict_prompts_are_what_they_hold(qwen2_triple: tuple) -> None:
    llm = LLM(*map(str, qwen2_triple), lam=0.7, device="cpu", dtype="float32", block_size=4, kv_cache_blocks=64)
    text, ids = "the cat sat", [5, 9, 9, 17, 4]
    plain = llm.generate([text, ids], GREEDY, use_tqdm=False)
    dicts = llm.generate([{"prompt": text}, {"prompt_token_ids": ids}], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in dicts] == [o.outputs[0].token_ids for o in plain]
    assert dicts[0].prompt == text and dicts[1].prompt is None
    assert dicts[0].prompt_token_ids == plain[0].prompt_token_ids
    single = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)  # one dict: one prompt
    assert len(single) == 1 and single[0].outputs[0].token_ids == plain[1].outputs[0].token_ids
    engine = llm.llm_engine
    for bad, match in (({"prompt": text, "prompt_token_ids": ids}, "exactly one"), ({}, "exactly one"),
                       ({"prompt_token_ids": ids, "multi_modal_data": {}}, "multi_modal_data"),
                       ({"prompt_token_ids": "5 9"}, "token ids"), ({"prompt": ids}, "holds text")):
        with pytest.raises(RastError, match=match):
            engine.add_request("bad", bad, GREEDY)
    assert not engine.has_unfinished_requests() and "bad" not in engine.groups


def test_token_ids_may_come_as_numpy_or_torch(qwen2_triple: tuple) -> None:
    """A tokenizer's return_tensors row (numpy or torch, one dimension) or numpy integers in a list are the
    same prompt as the Python ints; bools, floats and 2-D arrays are refused before the engine changes."""
    np = pytest.importorskip("numpy")
    import torch

    llm = LLM(*map(str, qwen2_triple), lam=0.7, device="cpu", dtype="float32", block_size=4, kv_cache_blocks=64)
    ids = [5, 9, 9, 17, 4]
    want = llm.generate(ids, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    for given in (np.array(ids), torch.tensor(ids), [np.int64(t) for t in ids], np.array(ids, dtype=np.int32)):
        (one,) = llm.generate(given, GREEDY, use_tqdm=False)  # one prompt, not a batch of single ids
        assert one.outputs[0].token_ids == want and one.prompt_token_ids == ids
        assert all(type(t) is int for t in one.prompt_token_ids)
        assert llm.generate({"prompt_token_ids": given}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want
    engine = llm.llm_engine
    for bad in ([True, 5], [5.0, 9.0], np.array(ids, dtype=np.float32), torch.tensor([ids]), [np.bool_(True)]):
        with pytest.raises(RastError, match="token ids"):
            engine.add_request("bad", bad, GREEDY)
    assert not engine.has_unfinished_requests() and "bad" not in engine.groups


def test_a_cache_salt_shares_prefix_blocks_only_within_its_salt(qwen2_triple: tuple) -> None:
    """vLLM's cache_salt: the same prompt under another salt (or none) computes its blocks again, under the
    same salt it reuses them; the tokens are the same either way. A salt that is no non-empty string is
    refused."""
    llm = LLM(*map(str, qwen2_triple), lam=0.7, device="cpu", dtype="float32", block_size=4, kv_cache_blocks=64)
    bm, ids = llm.llm_engine.scheduler.bm, list(range(5, 37))

    def hits(prompt: object) -> tuple[list[int], int]:
        before = bm.prefix_hits
        return llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids, bm.prefix_hits - before

    want, _ = hits(ids)
    assert hits(ids) == (want, 7)  # the last block holds the token the prefill must compute
    for salt in ("a", "b"):
        assert hits({"prompt_token_ids": ids, "cache_salt": salt}) == (want, 0)
        assert hits({"prompt_token_ids": ids, "cache_salt": salt}) == (want, 7)
    for bad in ("", 5):
        with pytest.raises(RastError, match="cache_salt"):
            llm.llm_engine.add_request("bad", {"prompt_token_ids": ids, "cache_salt": bad}, GREEDY)
    assert not llm.llm_engine.has_unfinished_requests()
