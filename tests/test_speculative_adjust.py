"""Logit adjustments inside speculative rounds (engine/speculative/adjust.py).

The oracles:
- the plain engine: the coupled method's tokens are the plain sampler's for the same seed, so adjusted
  requests (penalties, logit_bias, min_tokens, allowed_token_ids, bad words of one and of two tokens) must
  give exactly the plain engine's tokens, whose own adjustments test_logit_adjust.py and
  test_token_masks.py check against HF transformers;
- HF transformers' forwards with HF's logits processors (logit_adjust_util.oracle_logits): the rejection
  method's sampled second tokens follow the adjusted RAST distribution (chi-square)."""
from __future__ import annotations

import pytest
import torch
from logit_adjust_util import PENALTIES, oracle_logits

from rast_engine import LLM, SamplingParams
from test_speculative import LAM, PROMPTS

KW = dict(lam=LAM, block_size=4, max_model_len=48)


def _word(llm: LLM, output: list[int], length: int) -> tuple[str, list[int]]:
    """A text that spells ``length`` consecutive tokens of ``output`` as a bad word (banning it changes that
    output), and those tokens."""
    tok = llm.get_tokenizer()
    for i in range(len(output) - length + 1):
        span = output[i:i + length]
        text = tok.decode(span)
        if text.strip() and tok.encode(text.lstrip(), add_special_tokens=False) == span:
            return text, span
    pytest.skip(f"no {length} tokens of {output} spell a bad word")


def _contains(ids: list[int], span: list[int]) -> bool:
    return any(ids[i:i + len(span)] == span for i in range(len(ids) - len(span) + 1))


def _adjusted_params(llm: LLM) -> tuple[list[SamplingParams], list[int]]:
    """One request per adjustment (the last one's prompt is PROMPTS[1]: _runs), and the two tokens of its bad word."""
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    plain, other = (o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], greedy, use_tqdm=False))
    word, span = _word(llm, plain, 2)
    single, _ = _word(llm, other, 1)
    return [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, ignore_eos=True, seed=3, n=2, **PENALTIES),
            SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, bad_words=[word, single], logprobs=1),
            SamplingParams(temperature=0.8, max_tokens=24, seed=4, logit_bias={5: 2.0, 9: -100.0}, min_tokens=10,
                           stop_token_ids=[plain[3]]),
            SamplingParams(temperature=1.0, max_tokens=24, seed=6, allowed_token_ids=list(range(3, 80, 3)),
                           ignore_eos=True, logprobs=0),
            SamplingParams(temperature=0.0, max_tokens=20, min_tokens=4, stop_token_ids=[other[0]])], span


def _runs(llm: LLM, params: list[SamplingParams]) -> list:
    outs = llm.generate((PROMPTS + PROMPTS[1:2])[:len(params)], params, use_tqdm=False)
    return [[(c.token_ids, c.finish_reason, c.logprobs) for c in o.outputs] for o in outs]


@pytest.mark.parametrize("gamma, draft, blocks", [(3, "small", 128), (4, "rl", 14), (2, "small", 128)])
def test_coupled_rounds_with_adjustments_give_the_plain_tokens(near_triple: tuple, gamma: int, draft: str,
                                                               blocks: int) -> None:
    """Every adjustment at once, in rounds of any length, with preemptions (blocks=14): the plain engine's
    tokens and logprobs; each adjustment did change its output, and the bad word of two tokens is absent
    where the unadjusted output had it."""
    plain = LLM(*near_triple, kv_cache_blocks=128, **KW)
    params, span = _adjusted_params(plain)
    want = _runs(plain, params)
    spec = LLM(*near_triple, kv_cache_blocks=blocks, speculative_tokens=gamma, speculative_draft=draft, **KW)
    got = _runs(spec, params)
    assert [[c[:2] for c in r] for r in got] == [[c[:2] for c in r] for r in want]
    for mine, theirs in ((got[1][0][2], want[1][0][2]), (got[3][0][2], want[3][0][2])):
        assert [sorted(a) for a in mine] == [sorted(b) for b in theirs]
        assert max(abs(a[k] - b[k]) for a, b in zip(mine, theirs) for k in a) < 1e-5
    stats = spec.llm_engine.stats()
    assert 0 < stats.spec_accepted_tokens_total < stats.spec_draft_tokens_total
    assert blocks == 128 or spec.llm_engine.scheduler.num_preemptions > 0
    bare = [SamplingParams(temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens, seed=p.seed, n=p.n,
                           ignore_eos=True) for p in params]
    unadjusted = _runs(plain, bare)
    assert all(a[0][0] != b[0][0] for a, b in zip(got, unadjusted))
    assert _contains(unadjusted[1][0][0], span) and not _contains(got[1][0][0], span)
    assert len(got[2][0][0]) >= 10 and set(got[3][0][0]) <= set(range(3, 80, 3))
    # the unadjusted greedy first token, as a stop id, held off for 4 tokens: it ends the output once it may
    assert got[4][0][1] == "stop" and len(got[4][0][0]) > 4


def test_adjusted_drafts_keep_being_accepted(near_triple: tuple) -> None:
    """The drafts are adjusted as the target is: with allowed_token_ids, a draft outside the allowed ids
    would always fail, so unadjusted drafts would pass far less often than drafts of the bare request."""
    allowed = list(range(3, 80, 3))
    rates = []
    for extra in ({}, {"allowed_token_ids": allowed}):
        spec = LLM(*near_triple, kv_cache_blocks=128, speculative_tokens=3, **KW)
        spec.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, **extra),
                      use_tqdm=False)
        stats = spec.llm_engine.stats()
        rates.append(stats.spec_accepted_tokens_total / stats.spec_draft_tokens_total)
    assert rates[1] > 0.5 * rates[0] > 0


@pytest.mark.parametrize("draft", ["small", "rl"])
def test_rejection_rounds_with_adjustments_give_the_plain_greedy_tokens(near_triple: tuple, draft: str) -> None:
    plain = LLM(*near_triple, kv_cache_blocks=128, **KW)
    params, _ = _adjusted_params(plain)
    greedy = [SamplingParams(**{**{k: getattr(p, k) for k in ("max_tokens", "ignore_eos", "logit_bias", "min_tokens",
                                                                 "stop_token_ids", "allowed_token_ids",
                                                                 "repetition_penalty", "frequency_penalty",
                                                                 "presence_penalty", "bad_words")},
                                  "temperature": 0.0}) for p in params]
    spec = LLM(*near_triple, kv_cache_blocks=128, speculative_tokens=3, speculative_draft=draft,
               speculative_method="rejection", **KW)
    got, want = _runs(spec, greedy), _runs(plain, greedy)
    assert [[c[:2] for c in r] for r in got] == [[c[:2] for c in r] for r in want]
    assert spec.llm_engine.stats().spec_accepted_tokens_total > 0


def test_rejection_rounds_follow_the_adjusted_distribution(near_triple: tuple) -> None:
    """Second tokens sampled through rounds (penalties and a bias; draft accepted or replaced), given the
    most frequent first token, against softmax(top-4 of the adjusted M + λ(R − S)) from HF forwards."""
    from scipy.stats import chisquare

    llm = LLM(*near_triple, lam=LAM, block_size=4, kv_cache_blocks=512, max_num_seqs=128, speculative_tokens=3,
              speculative_method="rejection")
    prompt = llm.get_tokenizer().encode(PROMPTS[1])
    first = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)[0].outputs[0]
    params = SamplingParams(n=2000, temperature=1.0, top_k=4, max_tokens=2, ignore_eos=True, seed=11,
                            logit_bias={first.token_ids[0]: 1.5}, **PENALTIES)
    outs = [c.token_ids for c in llm.generate([prompt], params, use_tqdm=False)[0].outputs]
    stats = llm.llm_engine.stats()
    assert 0 < stats.spec_accepted_tokens_total < stats.spec_draft_tokens_total
    head = max(set(o[0] for o in outs), key=[o[0] for o in outs].count)
    seconds = torch.tensor([o[1] for o in outs if o[0] == head])
    z = oracle_logits(near_triple, prompt + [head], len(prompt), llm.llm_engine.vocab_size, params).double()
    top = z.topk(4)
    expected = torch.softmax(top.values, 0) * len(seconds)
    counts = torch.stack([(seconds == t).sum() for t in top.indices]).double()
    assert counts.sum().item() == len(seconds)
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-4



def test_a_bad_word_whose_prefix_reaches_into_the_prompt_bans_nothing(near_triple: tuple) -> None:
    """vLLM matches bad words against the output only: a word made of the prompt's last token and the first
    two generated ones must not ban the second, in a round (whose context starts with the output's tail)
    as in plain decoding."""
    plain = LLM(*near_triple, kv_cache_blocks=128, **KW)
    tok = plain.get_tokenizer()
    prompt = tok.encode(PROMPTS[0])
    greedy = dict(temperature=0.0, max_tokens=10, ignore_eos=True)
    out = plain.generate([prompt], SamplingParams(**greedy), use_tqdm=False)[0].outputs[0].token_ids
    span = [prompt[-1]] + out[:2]
    word = tok.decode(span)
    if tok.encode(word.lstrip(), add_special_tokens=False) != span:
        pytest.skip(f"{span} does not spell a bad word")
    params = SamplingParams(**greedy, bad_words=[word])
    want = plain.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    spec = LLM(*near_triple, kv_cache_blocks=128, speculative_tokens=3, **KW)
    assert spec.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == want
    assert want[:2] == out[:2]
