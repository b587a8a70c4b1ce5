"""vLLM's request extras that RL and multi-tenant deployments send: ``return_tokens_as_token_ids`` (logprobs
name tokens "token_id:<id>") and ``cache_salt`` (a prompt shares prefix-cache blocks only with requests of
the same salt). Oracles: the offline engine on the same models, and the engine's prefix-cache hit count."""
from __future__ import annotations

import httpx
import pytest

from rast_engine import LLM, SamplingParams
from server_util import MODEL, PROMPTS, Running


def test_logprobs_name_tokens_by_id(srv: Running, server_oracle: LLM) -> None:
    client = srv.client()
    res = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=2,
                                    extra_body={"return_tokens_as_token_ids": True})
    want = server_oracle.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, logprobs=2),
                                  use_tqdm=False)[0].outputs[0]
    lp = res.choices[0].logprobs
    assert lp.tokens == [f"token_id:{t}" for t in want.token_ids]
    for top, entry in zip(lp.top_logprobs, want.logprobs):
        assert {int(k.removeprefix("token_id:")): v for k, v in top.items()} == pytest.approx(
            {t: entry[t] for t in map(int, (k.removeprefix("token_id:") for k in top))})
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=2)
    assert plain.choices[0].logprobs.tokens != lp.tokens and plain.choices[0].text == res.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"return_tokens_as_token_ids": True})
    content = chat.choices[0].logprobs.content
    ids = [int(c.token.removeprefix("token_id:")) for c in content]
    assert server_oracle.get_tokenizer().decode(ids) == chat.choices[0].message.content
    assert all(c.bytes == list(c.token.encode()) and all(t.token.startswith("token_id:") for t in c.top_logprobs)
               for c in content)


def test_a_cache_salt_shares_blocks_only_with_its_own_salt(srv: Running, server_oracle: LLM) -> None:
    bm = srv.server.engine.engine.scheduler.bm
    prompt = list(range(5, 69))  # several full blocks, new to this server

    def hits(**extra: object) -> int:
        before = bm.prefix_hits
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0, **extra}
        res = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).json()
        assert res["choices"][0]["text"] == want
        return bm.prefix_hits - before

    want = server_oracle.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=3),
                                  use_tqdm=False)[0].outputs[0].text
    assert hits() == 0 and hits() > 0  # unsalted requests share the cache
    assert hits(cache_salt="tenant-a") == 0 and hits(cache_salt="tenant-a") > 0
    assert hits(cache_salt="tenant-b") == 0
    for bad in ("", 3):
        res = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "cache_salt": bad})
        assert res.status_code == 400 and "cache_salt" in res.text


def test_return_token_ids_gives_the_sampled_ids(srv: Running, server_oracle: LLM) -> None:
    """vLLM's return_token_ids: the offline engine's prompt and output ids for the same seeded request, whole
    and streamed (the prompt's in the first chunk, each chunk's own new ids, joining to the whole)."""
    import json

    tok = server_oracle.get_tokenizer()
    body = {"model": MODEL, "max_tokens": 6, "temperature": 1.0, "seed": 5, "return_token_ids": True}
    prompts = PROMPTS[:2]
    res = httpx.post(f"{srv.url}/v1/completions", json={**body, "prompt": prompts, "n": 2}).json()
    for i, choice in enumerate(res["choices"]):
        want = server_oracle.generate(prompts[i // 2], SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=6),
                                      use_tqdm=False)[0]
        assert choice["prompt_token_ids"] == want.prompt_token_ids == tok.encode(prompts[i // 2])
        assert choice["token_ids"] == want.outputs[i % 2].token_ids
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(f"{srv.url}/v1/chat/completions", json={**body, "messages": messages}).json()
    want = server_oracle.chat(messages, SamplingParams(temperature=1.0, seed=5, max_tokens=6), use_tqdm=False)[0]
    assert chat["prompt_token_ids"] == want.prompt_token_ids
    assert chat["choices"][0]["token_ids"] == want.outputs[0].token_ids
    for url, extra in (("/v1/chat/completions", {"messages": messages}), ("/v1/completions", {"prompt": prompts[0]})):
        text = httpx.post(f"{srv.url}{url}", json={**body, **extra, "stream": True}).text
        chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        prompt_ids = [c.get("prompt_token_ids") or c["choices"][0].get("prompt_token_ids") for c in chunks
                      if c.get("prompt_token_ids") or (c["choices"] and c["choices"][0].get("prompt_token_ids"))]
        whole = chat if url == "/v1/chat/completions" else None
        want_prompt = whole["prompt_token_ids"] if whole else tok.encode(prompts[0])
        assert len(prompt_ids) == 1 and prompt_ids[0] == want_prompt
        streamed = [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids", [])]
        assert streamed == (whole["choices"][0]["token_ids"] if whole else res["choices"][0]["token_ids"])
    assert "token_ids" not in httpx.post(f"{srv.url}/v1/completions", json={
        "model": MODEL, "prompt": prompts[0], "max_tokens": 2}).json()["choices"][0]
