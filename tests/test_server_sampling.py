"""`rast serve`'s sampling and request fields end to end (OpenAI's and vLLM's extra body fields, stops,
seeds, logprobs, bad values): the official openai client against our server over a tiny random Qwen2
triple; the oracle is the offline engine on the same models (itself tested against HF transformers)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from rast_engine import LLM, SamplingParams
from server_util import MODEL, PROMPTS, Running


def greedy(oracle: LLM, prompt: str | list[int], **params: Any) -> Any:
    """The offline engine's greedy completion of 12 tokens (a CompletionOutput)."""
    return oracle.generate(prompt, SamplingParams(temperature=0, max_tokens=12, **params), use_tqdm=False)[0].outputs[0]


def test_extra_body_fields(srv: Running, server_triple: tuple[Path, Path, Path]) -> None:
    client = srv.client()
    greedy = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0)
    # top_k=1 and min_p=1 both leave only the argmax, so sampling at T=1 must reproduce greedy
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        res = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=1.0,
                                        seed=3, extra_body=extra)
        assert res.choices[0].text == greedy.choices[0].text, extra
    # λ = 0 removes the small pair: the large model alone, loaded without it, is the server_oracle
    alone = LLM(str(server_triple[0]), device="cpu", dtype="float32", kv_cache_blocks=64)
    want = alone.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    for lam in (0.0, [0.0]):  # a number, or a list of one per small pair
        res = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                        extra_body={"lam": lam})
        assert res.choices[0].text == want.outputs[0].text, lam


def test_penalties_reach_the_engine(srv: Running, server_oracle: LLM) -> None:
    penalties = dict(presence_penalty=0.8, frequency_penalty=1.5, repetition_penalty=1.3)
    want, plain = greedy(server_oracle, PROMPTS[1], **penalties), greedy(server_oracle, PROMPTS[1])
    assert want.text != plain.text  # else this test could not tell them apart
    res = srv.client().completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                          presence_penalty=0.8, frequency_penalty=1.5,
                                          extra_body={"repetition_penalty": 1.3})
    assert res.choices[0].text == want.text


def test_plausibility_alpha_reaches_the_engine(srv: Running, server_oracle: LLM) -> None:
    want, plain = greedy(server_oracle, PROMPTS[1], plausibility_alpha=0.9), greedy(server_oracle, PROMPTS[1])
    assert want.text != plain.text  # else this test could not tell them apart
    res = srv.client().completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                          extra_body={"plausibility_alpha": 0.9})
    assert res.choices[0].text == want.text


def test_logit_bias_and_min_tokens_reach_the_engine(srv: Running, server_oracle: LLM) -> None:
    plain = greedy(server_oracle, PROMPTS[1])
    ban = {plain.token_ids[0]: -100.0, 7: 2.0}
    want = greedy(server_oracle, PROMPTS[1], logit_bias=ban)
    assert want.token_ids[0] != plain.token_ids[0]
    res = srv.client().completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                          logit_bias={str(t): b for t, b in ban.items()})
    assert res.choices[0].text == want.text
    # a stop string the greedy text reaches early is not matched before min_tokens (vLLM's rule), so
    # the output runs on; the stop token it ends with is masked until then
    full = greedy(server_oracle, PROMPTS[2])
    res = srv.client().completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                          stop=[full.text[2:4]], extra_body={"min_tokens": 10})
    assert (res.choices[0].text, res.choices[0].finish_reason) == (full.text, "length")
    res = srv.client().completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                          extra_body={"min_tokens": 4, "stop_token_ids": [full.token_ids[1]]})
    assert res.usage.completion_tokens > 4  # 2 without min_tokens


def test_token_masks_reach_the_engine(srv: Running, server_oracle: LLM) -> None:
    plain = greedy(server_oracle, PROMPTS[1])
    masks = {"allowed_token_ids": sorted(set(range(8, 100)) - {plain.token_ids[1]}), "bad_words": [plain.text.split()[0]]}
    want = greedy(server_oracle, PROMPTS[1], **masks)
    assert want.token_ids != plain.token_ids
    res = srv.client().completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0, extra_body=masks)
    assert res.choices[0].text == want.text


def test_truncate_prompt_tokens_keeps_the_prompts_end(srv: Running, server_oracle: LLM) -> None:
    """vLLM's truncate_prompt_tokens: offline, and in the server before its context check, so a prompt
    longer than the context is served from its last k tokens."""
    tok = server_oracle.get_tokenizer()
    ids = tok.encode(" ".join([PROMPTS[0]] * 200))
    assert len(ids) > srv.server.engine.max_model_len
    want = greedy(server_oracle, ids[-40:])
    got = server_oracle.generate(ids, SamplingParams(temperature=0, max_tokens=12, truncate_prompt_tokens=40),
                                 use_tqdm=False)[0]
    assert (got.prompt_token_ids, got.outputs[0].text) == (ids[-40:], want.text)
    res = srv.client().completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0,
                                          extra_body={"truncate_prompt_tokens": 40})
    assert (res.choices[0].text, res.usage.prompt_tokens) == (want.text, 40)
    # -1: as many as the context leaves room for (one generated token)
    got = server_oracle.generate(ids, SamplingParams(temperature=0, max_tokens=1, truncate_prompt_tokens=-1),
                                 use_tqdm=False)[0]
    room = server_oracle.llm_engine.max_model_len - 1
    assert got.prompt_token_ids == ids[-room:] and len(got.outputs[0].token_ids) == 1


def test_special_tokens_and_kept_stop_strings_reach_the_engine(srv: Running, server_oracle: LLM) -> None:
    tok = server_oracle.get_tokenizer()
    forced = {str(tok.eos_token_id): 100.0}  # EOS every step; ignore_eos keeps going
    client = srv.client()
    for skip in (True, False):
        res = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0,
                                        logit_bias=forced, extra_body={"ignore_eos": True, "skip_special_tokens": skip})
        assert res.choices[0].text == ("" if skip else tok.eos_token * 3)
    full = greedy(server_oracle, PROMPTS[2])
    stop = full.text[3:5]
    for stream in (False, True):
        res = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0, stop=[stop],
                                        stream=stream, extra_body={"include_stop_str_in_output": True})
        chunks = list(res) if stream else [res]
        assert "".join(c.choices[0].text for c in chunks) == full.text[:full.text.find(stop) + len(stop)]
        assert chunks[-1].choices[0].model_extra["stop_reason"] == stop  # vLLM's field: what stopped it
    res = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert res.choices[0].finish_reason == "length" and res.choices[0].model_extra["stop_reason"] is None


def test_stop_strings_streamed_and_not(srv: Running, server_oracle: LLM) -> None:
    full = server_oracle.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    stop = full.outputs[0].text[4:6]  # a string the greedy text is known to reach
    want = server_oracle.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12, stop=[stop]),
                           use_tqdm=False)[0].outputs[0]
    assert want.finish_reason == "stop"
    client = srv.client()
    res = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0, stop=[stop])
    assert (res.choices[0].text, res.choices[0].finish_reason) == (want.text, "stop")
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_requests_are_reproducible(srv: Running) -> None:
    client = srv.client()

    def draw(seed: int) -> list[str]:
        res = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=1.0,
                                        n=3, seed=seed)
        return [c.text for c in res.choices]

    first = draw(11)
    assert draw(11) == first
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=1.0,
                                       n=3, seed=11, stream=True)
    texts = ["", "", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == first


def test_logprobs(srv: Running, server_oracle: LLM) -> None:
    res = srv.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                          logprobs=2)
    want = server_oracle.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, logprobs=2),
                           use_tqdm=False)[0].outputs[0]
    lp = res.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([d[t] for t, d in zip(want.token_ids, want.logprobs)])
    assert all(len(top) == 2 for top in lp.top_logprobs)
    # streamed: each token's logprobs exactly once, carried by the chunk that shows its text
    chunks = list(srv.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                                  logprobs=2, stream=True))
    assert [x for c in chunks for x in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs
    assert "".join(c.choices[0].text for c in chunks) == res.choices[0].text
    # sampled: a token outside the top k still heads its position's top_logprobs (OpenAI's legacy API and
    # vLLM: up to k + 1 entries), and logprobs=0 gives it alone
    for k in (0, 1):
        res = srv.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=1.5,
                                              seed=11, logprobs=k)
        lp = res.choices[0].logprobs
        assert all(list(top)[0] == tok and top[tok] == own and len(top) <= k + 1
                   for tok, own, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
        assert k == 1 and any(len(top) == 2 for top in lp.top_logprobs) or k == 0, "setup: every draw was the top 1"
    chat = srv.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)


def test_echo_with_max_tokens_0_scores_the_prompt_alone(srv: Running, server_oracle: LLM) -> None:
    ids = server_oracle.get_tokenizer().encode(PROMPTS[0])
    body = {"model": MODEL, "prompt": ids, "echo": True, "logprobs": 1, "temperature": 0}
    scored = httpx.post(f"{srv.url}/v1/completions", json={**body, "max_tokens": 0}).json()
    longer = httpx.post(f"{srv.url}/v1/completions", json={**body, "max_tokens": 1}).json()
    [ch], [one] = scored["choices"], longer["choices"]
    assert ch["text"] == PROMPTS[0] and ch["finish_reason"] == "length"
    assert ch["logprobs"]["token_logprobs"][0] is None and len(ch["logprobs"]["tokens"]) == len(ids)
    assert {k: v[:len(ids)] for k, v in one["logprobs"].items()} == ch["logprobs"]
    assert scored["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    stream = httpx.post(f"{srv.url}/v1/completions", json={**body, "max_tokens": 0, "stream": True}).text
    chunks = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == PROMPTS[0]


def test_null_takes_the_default_where_openai_allows_it(srv: Running) -> None:
    """OpenAI's client sends a None argument as null: n, stream, echo, logprobs and the penalties take
    their defaults; max_tokens null is still 'the rest of the context'."""
    client = srv.client()
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=6, temperature=0)
    nulls = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=6, temperature=0, n=None,
                                      stream=None, echo=None, presence_penalty=None, frequency_penalty=None,
                                      extra_body={"min_tokens": None, "ignore_eos": None})
    assert nulls.choices[0].text == plain.choices[0].text and len(nulls.choices) == 1
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=None, n=None)
    assert chat.choices[0].logprobs is None and chat.usage.completion_tokens <= 3
    room = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": [5] * 505, "max_tokens": None,
                                                         "temperature": 0, "ignore_eos": True}).json()
    assert room["usage"]["completion_tokens"] == 7  # the 512-token context's room


BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"prompt": "hi"}, 400, "model"),
    ({"model": MODEL, "prompt": "hi", "lamda": 1.0}, 400, "lamda"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "top_k": -2}, 400, "top_k"),
    ({"model": MODEL, "prompt": "hi", "stop": ""}, 400, "stop"),
    ({"model": MODEL, "prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"x1": 1.0}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"100000": 1}}, 400, "logit_bias"),  # past the vocabulary
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"9" * 5000: 1}}, 400, "logit_bias"),  # int() would refuse it
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"1": 1, "01": -1}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "hi", "repetition_penalty": 1e-39}, 400, "repetition_penalty"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {str(t): 1 for t in range(1025)}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "hi", "allowed_token_ids": [3, 100000]}, 400, "allowed_token_ids"),
    ({"model": MODEL, "prompt": "hi", "allowed_token_ids": []}, 400, "allowed_token_ids"),
    ({"model": MODEL, "prompt": "hi", "allowed_token_ids": [-1]}, 400, "allowed_token_ids"),
    ({"model": MODEL, "prompt": "hi", "allowed_token_ids": [2], "min_tokens": 1}, 400, "allowed_token_ids"),  # EOS
    ({"model": MODEL, "prompt": "hi", "structured_outputs": {"json_object": 1}}, 400, "structured_outputs"),
    ({"model": MODEL, "prompt": "hi", "bad_words": "the"}, 400, "bad_words"),
    ({"model": MODEL, "prompt": "hi", "bad_words": ["answer " * 300]}, 400, "bad_words"),  # over 1024 tokens
    ({"model": MODEL, "prompt": "hi", "min_tokens": 20, "max_tokens": 5}, 400, "min_tokens"),
    ({"model": MODEL, "prompt": "hi", "min_tokens": -1}, 400, "min_tokens"),
    ({"model": MODEL, "prompt": "hi", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
    ({"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": MODEL, "prompt": "hi", "best_of": 2}, 400, "best_of"),
    ({"model": MODEL, "prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ({"model": MODEL, "prompt": "hi", "lam": [1.0, 2.0]}, 400, "lam"),  # one pair: one λ
    ({"model": MODEL, "prompt": "hi", "plausibility_alpha": 1.5}, 400, "plausibility_alpha"),
    ({"model": MODEL, "prompt": [True, False]}, 400, "prompt"),  # not token ids 1 and 0
    ({"model": MODEL, "prompt": "hi", "stop_token_ids": [True]}, 400, "stop_token_ids"),
    ({"model": MODEL, "prompt": "hi", "stop": ["s"] * 129}, 400, "stop"),
    ({"model": MODEL, "prompt": "hi", "stop_token_ids": list(range(1025))}, 400, "stop_token_ids"),
    (('{"model": "%s", "prompt": "hi", "temperature": NaN}' % MODEL).encode(), 400, "temperature"),
    ({"model": MODEL, "prompt": [5] * 600}, 400, "prompt"),  # longer than the 512-token context
    ({"model": MODEL, "prompt": [100000]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),  # 0 only with echo
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0, "echo": True, "min_tokens": 1}, 400, "min_tokens"),
    ({"model": MODEL, "prompt": None}, 400, "prompt"),  # null is no default of a required field
    ({"model": "other", "prompt": "hi"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_inputs_get_openai_errors(srv: Running, body: Any, status: int, param: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{srv.url}/v1/completions", content=content,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_min_tokens_beyond_the_context_names_the_room(srv: Running) -> None:
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": [5] * 500, "min_tokens": 20,
                                                      "max_tokens": None})
    assert r.status_code == 400 and "at most 12 can be generated" in r.json()["error"]["message"]
