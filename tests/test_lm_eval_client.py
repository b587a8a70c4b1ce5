"""lm-evaluation-harness' own `local-completions` client against the server: it detects the remote
tokenizer (/tokenizer_info, /tokenize), sends batched token-id loglikelihood requests with echo and
logprobs=1, and its loglikelihoods and greedy flags must be the offline engine's prompt_logprobs. Runs
where lm-eval is installed (`pip install "lm-eval[api]"`, not part of the test extras: it pulls
datasets and friends); skipped elsewhere."""
from __future__ import annotations

import pytest

from rast_engine import LLM, SamplingParams
from server_util import MODEL

pytest.importorskip("tenacity")
openai_completions = pytest.importorskip("lm_eval.models.openai_completions")
instance = pytest.importorskip("lm_eval.api.instance")

PAIRS = [("the cat sat on", " the mat"), ("what is the answer?", " let us think"), ("3 + 5 =", " 8")]


def test_loglikelihood_and_generate_until(srv: object, server_oracle: LLM) -> None:
    lm = openai_completions.LocalCompletionsAPI(base_url=f"{srv.url}/v1/completions", model=MODEL,
                                                tokenizer_backend="auto", tokenized_requests=True, num_concurrent=1,
                                                max_length=256, batch_size=2)
    assert lm.tokenizer_backend == "remote"
    reqs = [instance.Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(PAIRS)]
    for (ctx, cont), (ll, greedy) in zip(PAIRS, lm.loglikelihood(reqs, disable_tqdm=True)):
        c, k = lm._encode_pair(ctx, cont)
        out = server_oracle.generate(c + k, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1),
                                     use_tqdm=False)[0]
        entries = [out.prompt_logprobs[len(c) + i] for i in range(len(k))]
        assert ll == pytest.approx(sum(e[t] for e, t in zip(entries, k)), abs=1e-4)
        assert greedy == all(max(e.values()) == e[t] for e, t in zip(entries, k))
    gen = instance.Instance(request_type="generate_until", doc={},
                            arguments=("the cat sat on", {"until": ["."], "max_gen_toks": 8}), idx=0)
    want = server_oracle.generate("the cat sat on", SamplingParams(temperature=0, max_tokens=8, stop=["."]),
                                  use_tqdm=False)[0].outputs[0].text
    assert lm.generate_until([gen], disable_tqdm=True) == [want]
