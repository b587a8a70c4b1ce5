"""prompt_logprobs against HF transformers: one forward of each model over the prompt gives Eq. 3's combined
logits at every position (with the request's λ), and each prompt token's entry must be log_softmax(z) of
the position before it, with the top k there. The engine computes them inside its own prefill, so they
must hold through chunked prefill, prefix caching, preemption, async scheduling and n > 1."""
from __future__ import annotations

import pytest
import torch
from logit_adjust_util import LAM, hf_model, make_engine

from rast_engine import LLM, SamplingParams
from rast_engine.errors import RastError
from rast_engine.prompt_logprobs import pending

PROMPT = [5, 9, 9, 17, 4, 9, 33, 2, 70, 70, 12, 40, 41, 8, 9, 9, 17]


@torch.no_grad()
def oracle(triple: tuple, prompt: list[int], lam: float, vocab: int) -> torch.Tensor:
    """[L, V] log_softmax of Eq. 3 at every position of the prompt (row p scores token p + 1)."""
    x = torch.tensor([prompt])
    large, rl, base = (hf_model(p)(x).logits[0, :, :vocab].float() for p in triple)
    return torch.log_softmax(large + lam * (rl - base), dim=-1)


def check(entries: list, prompt: list[int], lp: torch.Tensor, k: int, ranks: list | None = None) -> None:
    """``entries`` (and ``ranks``: vLLM's, how many tokens are at least as likely, checked to the oracle's
    rounding) against the oracle's rows ``lp``."""
    assert len(entries) == len(prompt) and entries[0] is None
    assert ranks is None or (len(ranks) == len(prompt) and ranks[0] is None)
    for p in range(1, len(prompt)):
        entry, row = entries[p], lp[p - 1]
        if ranks is not None:
            x = row[prompt[p]]
            assert int((row > x + 2e-4).sum()) + 1 <= ranks[p] <= int((row >= x - 2e-4).sum()), p
        want = {prompt[p]: row[prompt[p]].item()}
        if k:
            top = row.topk(k)
            want.update(zip(top.indices.tolist(), top.values.tolist()))
        assert entry.keys() == want.keys(), p
        for t in want:
            assert entry[t] == pytest.approx(want[t], abs=2e-4), (p, t)


def finals(engine: object, requests: dict) -> dict:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return done


@pytest.mark.parametrize("variant", ["plain", "chunked prefill", "async scheduling", "preemption"])
def test_prompt_logprobs_equal_the_oracle(qwen2_triple: tuple, variant: str) -> None:
    kw = {"plain": {}, "chunked prefill": dict(max_num_batched_tokens=5),
          "async scheduling": dict(async_output=True, async_scheduling=True),
          "preemption": dict(kv_cache_blocks=16, max_model_len=40)}[variant]
    engine = make_engine(qwen2_triple, **kw)
    vocab = engine.vocab_size
    requests = {"a": (PROMPT, SamplingParams(max_tokens=4, seed=1, prompt_logprobs=3)),
                "b": (PROMPT[3:], SamplingParams(n=2, max_tokens=6, seed=2, prompt_logprobs=0, lam=0.25)),
                "plain": (PROMPT[:9], SamplingParams(max_tokens=6, seed=3))}
    if variant == "preemption":
        requests.update({f"x{i}": (PROMPT[i:], SamplingParams(max_tokens=20, seed=i, ignore_eos=True))
                         for i in range(4)})
    out = finals(engine, requests)
    check(out["a"].prompt_logprobs, PROMPT, oracle(qwen2_triple, PROMPT, LAM, vocab), 3, out["a"].prompt_logprob_ranks)
    check(out["b"].prompt_logprobs, PROMPT[3:], oracle(qwen2_triple, PROMPT[3:], 0.25, vocab), 0,
          out["b"].prompt_logprob_ranks)
    assert out["plain"].prompt_logprobs is None and out["plain"].prompt_logprob_ranks is None
    if variant == "preemption":
        assert engine.scheduler.num_preemptions > 0


def test_a_step_scores_at_most_its_limit_of_prompt_tokens(qwen2_triple: tuple) -> None:
    """Scoring a prompt token costs a full-vocabulary logits row per model, so a step scores at most
    Scheduler.prompt_logprobs_tokens of them (4 here): prompts are cut into chunks of that size even
    though the budget would take them whole, and the entries are unchanged."""
    engine = make_engine(qwen2_triple)
    engine.scheduler.prompt_logprobs_tokens = 4
    launch, scored = engine.runner.launch, []

    def counting(seqs, is_prefill, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if is_prefill:
            scored.append(sum(s.num_scheduled_tokens for s in seqs if pending(s.group)))
        return launch(seqs, is_prefill, *args, **kw)

    engine.runner.launch = counting
    out = finals(engine, {"a": (PROMPT, SamplingParams(max_tokens=2, prompt_logprobs=1)),
                          "b": (PROMPT[2:], SamplingParams(max_tokens=2, prompt_logprobs=0, lam=0.25)),
                          "plain": (PROMPT, SamplingParams(max_tokens=2))})
    # 16 + 14 positions to score (a prompt's last one scores nothing), at most 4 a step
    assert max(scored) == 4 and sum(scored) >= 30 and len([n for n in scored if n]) >= 8
    check(out["a"].prompt_logprobs, PROMPT, oracle(qwen2_triple, PROMPT, LAM, engine.vocab_size), 1)
    check(out["b"].prompt_logprobs, PROMPT[2:], oracle(qwen2_triple, PROMPT[2:], 0.25, engine.vocab_size), 0)


def test_prefix_cache_hits_do_not_skip_them(qwen2_triple: tuple) -> None:
    """A prompt whose blocks are cached still gets every entry (its prefill takes no hits), and a
    request without prompt_logprobs still takes the hits."""
    engine = make_engine(qwen2_triple, enable_prefix_caching=True)
    finals(engine, {"warm": (PROMPT, SamplingParams(max_tokens=2))})
    hits = engine.block_manager.prefix_hits
    out = finals(engine, {"a": (PROMPT, SamplingParams(max_tokens=2, prompt_logprobs=1))})
    assert engine.block_manager.prefix_hits == hits
    check(out["a"].prompt_logprobs, PROMPT, oracle(qwen2_triple, PROMPT, LAM, engine.vocab_size), 1)
    finals(engine, {"again": (PROMPT, SamplingParams(max_tokens=2))})
    assert engine.block_manager.prefix_hits > hits


def test_delta_outputs_carry_them_once_and_generate_returns_them(qwen2_triple: tuple) -> None:
    engine = make_engine(qwen2_triple)
    engine.add_request("d", PROMPT, SamplingParams(max_tokens=5, prompt_logprobs=0, output_kind="delta"))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    carried = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
    assert len(carried) == 1 and outs[0].prompt_logprobs is carried[0] and len(carried[0]) == len(PROMPT)
    ranks = [o.prompt_logprob_ranks for o in outs if o.prompt_logprob_ranks is not None]
    assert len(ranks) == 1 and outs[0].prompt_logprob_ranks is ranks[0] and len(ranks[0]) == len(PROMPT)
    large, rl, base = map(str, qwen2_triple)
    llm = LLM(large, rl, base, lam=LAM, device="cpu", dtype="float32", kv_cache_blocks=64)
    got = llm.generate(PROMPT, SamplingParams(max_tokens=2, prompt_logprobs=2), use_tqdm=False)[0]
    check(got.prompt_logprobs, PROMPT, oracle(qwen2_triple, PROMPT, LAM, engine.vocab_size), 2)


def test_values_are_checked(qwen2_triple: tuple) -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(RastError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    engine = make_engine(qwen2_triple)
    with pytest.raises(RastError, match="prompt_logprobs") as info:
        engine.add_request("x", PROMPT, SamplingParams(prompt_logprobs=engine.vocab_size + 1))
    assert info.value.param == "prompt_logprobs"
    assert not engine.groups


def test_server_echo_serves_a_loglikelihood_request(srv: object, server_oracle: LLM) -> None:
    """lm-evaluation-harness' loglikelihood request to a completions server: token-id prompts (a batch),
    echo, logprobs=1, max_tokens=1, temperature 0. Each choice's logprobs start with the prompt's tokens
    (the first null) whose values are the offline engine's prompt_logprobs."""
    from server_util import MODEL, PROMPTS

    tok = server_oracle.get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS[:2]]
    res = srv.client().completions.create(model=MODEL, prompt=prompts, max_tokens=1, temperature=0, logprobs=1,
                                          echo=True, seed=1234)
    for choice, ids in zip(sorted(res.choices, key=lambda c: c.index), prompts):
        want = server_oracle.generate(ids, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1,
                                                          logprobs=1), use_tqdm=False)[0]
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for p in range(1, len(ids)):
            assert lp.token_logprobs[p] == pytest.approx(want.prompt_logprobs[p][ids[p]], abs=1e-5)
            top = max(want.prompt_logprobs[p].items(), key=lambda kv: kv[1])
            # the token's own entry first, then the top 1 (lm-eval's greediness test takes their max)
            own = [lp.token_logprobs[p]] + ([] if top[0] == ids[p] else [pytest.approx(top[1], abs=1e-5)])
            assert list(lp.top_logprobs[p].values()) == own
        assert choice.text == tok.decode(ids) + want.outputs[0].text
    assert res.usage.completion_tokens == 2 and res.usage.prompt_tokens == sum(map(len, prompts))


def test_server_echo_streams_the_prompt_first(srv: object, server_triple: tuple) -> None:
    from transformers import AutoTokenizer

    from server_util import MODEL, PROMPTS

    client = srv.client()
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, echo=True)
    assert whole.choices[0].text.startswith(PROMPTS[0]) and len(whole.choices[0].text) > len(PROMPTS[0])
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, echo=True,
                                            stream=True))
    assert chunks[0].choices[0].text.startswith(PROMPTS[0])
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    tok = AutoTokenizer.from_pretrained(str(server_triple[0]))
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, echo=True,
                                    extra_body={"truncate_prompt_tokens": 2})
    assert cut.choices[0].text.startswith(tok.decode(tok.encode(PROMPTS[0])[-2:]))  # the prompt the engine read
    assert cut.usage.prompt_tokens == 2


def test_server_prompt_logprobs_are_vllms_field(srv: object, server_oracle: LLM) -> None:
    """vLLM's prompt_logprobs request field: each completion choice carries its prompt's entries, a chat
    response its one prompt's, as {token id: {logprob, rank, decoded_token}} (the first token null),
    equal to the offline engine's values and ranks; the top k rank 1 to k. Not with a stream."""
    import httpx
    from server_util import MODEL, PROMPTS

    tok = server_oracle.get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS[:2]]

    def want(ids: list[int], k: int) -> list:
        out = server_oracle.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=k), use_tqdm=False)[0]
        entries = [None]
        for p in range(1, len(ids)):
            top = sorted(out.prompt_logprobs[p].items(), key=lambda kv: -kv[1])[:k]
            ranked = [(ids[p], out.prompt_logprobs[p][ids[p]], out.prompt_logprob_ranks[p])]
            ranked += [(t, lp, j + 1) for j, (t, lp) in enumerate(top)]
            entries.append({str(t): {"logprob": pytest.approx(lp, abs=1e-5), "rank": r, "decoded_token": tok.decode([t])}
                            for t, lp, r in ranked})
        return entries

    url = f"{srv.url}/v1"
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 2, "n": 2, "prompt_logprobs": 2, "echo": True,
            "logprobs": 1}
    res = httpx.post(f"{url}/completions", json=body, timeout=60).json()
    assert len(res["choices"]) == 4
    for choice in res["choices"]:
        ids = prompts[choice["index"] // 2]
        assert choice["prompt_logprobs"] == want(ids, 2)
        # echo's own k: each prompt token's entry first, then the top 1 (one entry when they are the same)
        tops, tokens = choice["logprobs"]["top_logprobs"][1:len(ids)], choice["logprobs"]["tokens"][1:len(ids)]
        assert all(next(iter(e)) == t and len(e) <= 2 for e, t in zip(tops, tokens))
    assert any(e["rank"] > 2 for entry in res["choices"][0]["prompt_logprobs"][1:] for e in entry.values())
    plain = httpx.post(f"{url}/completions", json={"model": MODEL, "prompt": prompts[0], "max_tokens": 1}).json()
    assert "prompt_logprobs" not in plain["choices"][0]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 2,
            "prompt_logprobs": 0}
    res = httpx.post(f"{url}/chat/completions", json=chat, timeout=60).json()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                             add_generation_prompt=True), add_special_tokens=False)
    assert res["prompt_logprobs"] == want(ids, 0)
    for path, streamed in (("completions", {**body, "stream": True}), ("chat/completions", {**chat, "stream": True})):
        r = httpx.post(f"{url}/{path}", json=streamed, timeout=60)
        assert (r.status_code, r.json()["error"]["param"]) == (400, "prompt_logprobs"), r.text


def test_vllm_entries_are_json_numbers_and_name_no_token_without_a_tokenizer() -> None:
    """A model's non-finite logits give -inf log-probabilities, which JSON cannot carry: they read -9999,
    as in OpenAI's and vLLM's responses; an engine without a tokenizer decodes no token (null)."""
    import json

    from rast_engine.outputs import CompletionOutput, RequestOutput
    from rast_engine.server.responses import UNLIKELY, Formatter

    done = CompletionOutput(index=0, text="", token_ids=[6], logprobs=None, finish_reason="length")
    out = RequestOutput(request_id="r", prompt=None, prompt_token_ids=[3, 4], outputs=[done], finished=True,
                        prompt_logprobs=[None, {5: -0.1, 4: float("-inf")}], prompt_logprob_ranks=[None, 2])
    fmt = Formatter("completion", "cmpl-1", "m", ["r"], 1, None, None, prompt_logprobs=1)
    fmt.add(out)
    body = fmt.body()
    assert body["choices"][0]["prompt_logprobs"] == [None, {"4": {"logprob": UNLIKELY, "rank": 2, "decoded_token": None},
                                                          "5": {"logprob": -0.1, "rank": 1, "decoded_token": None}}]
    json.dumps(body, allow_nan=False)
