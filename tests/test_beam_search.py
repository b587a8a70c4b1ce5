"""LLM.beam_search (engine/beam_search.py).

Oracles: HF transformers' own beam search (GenerationMixin, num_beams) over M with a logits processor
that turns M's log-probabilities into RAST's (log_softmax(log_softmax(M) + λ(R − S)) = log_softmax(M +
λ(R − S)), R and S run by HF on each beam's tokens); and, for what HF ranks otherwise (EOS, the length
penalty), a table of log-probabilities whose best beams are worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from rast_engine import LLM, BeamSearchParams, RequestOutput
from rast_engine.beam_search import beam_search
from rast_engine.errors import RastError
from rast_engine.outputs import CompletionOutput
from test_engine import LAM, PROMPTS, hf_model


class RastDelta(LogitsProcessor):
    def __init__(self, triple: tuple, lam: float, vocab: int) -> None:
        self.rl, self.base, self.lam, self.vocab = hf_model(triple[1]), hf_model(triple[2]), lam, vocab

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        v = self.vocab
        delta = self.rl(input_ids).logits[:, -1, :v].float() - self.base(input_ids).logits[:, -1, :v].float()
        out = torch.full_like(scores, -math.inf)
        out[:, :v] = torch.log_softmax(scores[:, :v] + self.lam * delta, dim=-1)
        return out


@pytest.fixture(scope="module")
def llm(qwen2_triple: tuple) -> LLM:
    large, rl, base = qwen2_triple
    return LLM(str(large), str(rl), str(base), lam=LAM, block_size=4, kv_cache_blocks=256, seed=3)


@pytest.mark.parametrize("lam", [None, 0.0])
def test_beams_are_hf_transformers_beam_search_of_the_combined_model(llm: LLM, qwen2_triple: tuple,
                                                                     lam: float | None) -> None:
    width, steps = 3, 5
    tok = llm.get_tokenizer()
    prompts = [list(tok.encode(p)) for p in PROMPTS[:2]]
    hits = llm.llm_engine.block_manager.prefix_hits
    got = llm.beam_search(prompts, BeamSearchParams(beam_width=width, max_tokens=steps, ignore_eos=True, lam=lam))
    assert llm.llm_engine.block_manager.prefix_hits > hits  # each step reads its parents' blocks from the cache
    large = hf_model(qwen2_triple[0])
    for prompt, out in zip(prompts, got):
        ref = large.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width, do_sample=False,
                             max_new_tokens=steps, min_new_tokens=steps, length_penalty=0.0, eos_token_id=None,
                             pad_token_id=0, return_dict_in_generate=True, output_scores=True,
                             logits_processor=LogitsProcessorList([RastDelta(qwen2_triple, LAM if lam is None else lam,
                                                                             llm.llm_engine.vocab_size)]))
        assert [s.tokens for s in out.sequences] == ref.sequences.tolist()
        assert [s.cum_logprob for s in out.sequences] == pytest.approx(ref.sequences_scores.tolist(), abs=1e-4)
        for s in out.sequences:
            assert len(s.logprobs) == steps and s.finish_reason == "length" and s.text == tok.decode(s.tokens)
            assert sum(entry[t] for entry, t in zip(s.logprobs, s.tokens[len(prompt):])) == \
                pytest.approx(s.cum_logprob, abs=1e-5)


EOS = 9


def _table_generate(table: dict[tuple, dict[int, float]], drawn: dict[tuple, int] | None = None):  # noqa: ANN202
    """A stand-in for LLM.generate: each prompt's next-token logprobs looked up by its tokens; the token
    drawn is ``drawn``'s, else the likeliest."""
    calls = []

    def generate(prompts: list, params) -> list[RequestOutput]:  # noqa: ANN001
        calls.append(len(prompts))
        outs = []
        for i, p in enumerate(prompts):
            entry = table[tuple(p)]
            token = (drawn or {}).get(tuple(p), max(entry, key=entry.get))
            outs.append(RequestOutput(str(i), None, list(p), [CompletionOutput(0, "", [token], "length",
                                                                               logprobs=[dict(entry)])]))
        return outs
    return generate, calls


@pytest.mark.parametrize("length_penalty, best", [(0.0, [(1, 2, 4), (1, EOS)]), (1.0, [(1, 2, 4), (1, 3, 5)]),
                                                  (-1.0, [(1, EOS), (1, 2, 4)])])
def test_eos_completes_a_beam_and_the_length_penalty_ranks_them(length_penalty: float, best: list) -> None:
    lp = math.log
    table = {(1,): {2: lp(0.5), EOS: lp(0.3), 3: lp(0.2)},
             (1, 2): {4: lp(0.9), EOS: lp(0.1)}, (1, 3): {5: lp(0.6), EOS: lp(0.4)},
             (1, 2, 4): {6: lp(0.5), EOS: lp(0.5)}, (1, 3, 5): {6: lp(1.0)}}
    generate, calls = _table_generate(table)
    out, = beam_search(generate, [[1]], BeamSearchParams(beam_width=2, max_tokens=2, length_penalty=length_penalty),
                       frozenset({EOS}), max_model_len=100)
    # step 1: EOS (0.3) completes; 2 (0.5) and 3 (0.2) live on. Step 2: (1,2,4) 0.45, (1,3,5) 0.12 live,
    # (1,2,EOS) 0.05 and (1,3,EOS) 0.08 complete. Scores: cum / len ** penalty, len without the EOS: at
    # penalty -1, (1,EOS) scores ln 0.3 = -1.20 (-2.41 were its EOS counted) and (1,2,4) 3 ln 0.45 = -2.40.
    assert [tuple(s.tokens) for s in out.sequences] == best and calls == [1, 2]
    want = {(1, 2, 4): (lp(0.45), "length"), (1, EOS): (lp(0.3), "stop"), (1, 3, 5): (lp(0.12), "length")}
    assert [(s.cum_logprob, s.finish_reason) for s in out.sequences] == \
        [(pytest.approx(want[b][0]), want[b][1]) for b in best]
    assert all(s.text is None for s in out.sequences)  # no tokenizer given


def test_a_beam_that_fills_the_context_is_complete() -> None:
    lp = math.log
    generate, calls = _table_generate({(1,): {2: lp(0.7), 3: lp(0.3)}, (1, 2): {4: lp(1.0)}, (1, 3): {4: lp(1.0)}})
    out, = beam_search(generate, [[1]], BeamSearchParams(beam_width=2, max_tokens=5), frozenset({EOS}),
                       max_model_len=2)
    assert [s.tokens for s in out.sequences] == [[1, 2], [1, 3]] and calls == [1]
    assert [s.finish_reason for s in out.sequences] == ["length", "length"]


def test_the_drawn_token_is_a_candidate_beside_the_top_two_width() -> None:
    lp = math.log
    table = {(1,): {2: lp(0.5), 3: lp(0.3), EOS: lp(0.2)}, (1, 2): {4: lp(0.01), 5: lp(0.01)}}
    # width 1 offers the top 2 (2 and 3) and the drawn EOS, which completes (1, EOS): ln 0.2 / 1 = -1.61
    # beats (1, 2, 4) at ln 0.005 / 3 = -1.77; without the drawn candidate only (1, 2, 4) would be found
    generate, _ = _table_generate(table, drawn={(1,): EOS})
    out, = beam_search(generate, [[1]], BeamSearchParams(beam_width=1, max_tokens=2, temperature=1.0),
                       frozenset({EOS}), max_model_len=100)
    assert [tuple(s.tokens) for s in out.sequences] == [(1, EOS)]
    assert out.sequences[0].cum_logprob == pytest.approx(lp(0.2))


@pytest.mark.parametrize("kw, param", [({"beam_width": 0}, "beam_width"), ({"max_tokens": True}, "max_tokens"),
                                       ({"temperature": -1.0}, "temperature"), ({"lam": "x"}, "lam"),
                                       ({"length_penalty": float("nan")}, "length_penalty"),
                                       ({"logprobs": -1}, "logprobs"), ({"logprobs": True}, "logprobs")])
def test_bad_params_are_refused_naming_the_field(kw: dict, param: str) -> None:
    with pytest.raises(RastError) as err:
        BeamSearchParams(**{"beam_width": 2, "max_tokens": 3, **kw})
    assert err.value.param == param


# ---- the server's use_beam_search (engine/server/beam_route.py), against LLM.beam_search ----
def test_the_server_returns_the_beams_as_choices(srv, server_oracle: LLM) -> None:  # noqa: ANN001
    import httpx

    tok = server_oracle.get_tokenizer()
    prompts = ["the cat sat on", "3 + 5 ="]
    r = httpx.post(f"{srv.url}/v1/completions", timeout=120, json={
        "model": "tiny-rast", "prompt": prompts, "n": 3, "max_tokens": 4, "use_beam_search": True,
        "length_penalty": 0.5, "temperature": 0})
    assert r.status_code == 200, r.text
    want = server_oracle.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=4, length_penalty=0.5))
    choices = r.json()["choices"]
    for i, out in enumerate(want):
        start = len(out.sequences[0].tokens) - len(out.sequences[0].logprobs)
        assert [(c["text"], c["finish_reason"]) for c in choices[3 * i:3 * i + 3]] == \
            [(tok.decode(s.tokens[start:], skip_special_tokens=True), s.finish_reason) for s in out.sequences]
    assert r.json()["usage"]["completion_tokens"] == sum(len(s.logprobs) for o in want for s in o.sequences)

    messages = [{"role": "user", "content": "the cat"}]
    chat = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120, json={
        "model": "tiny-rast", "messages": messages, "n": 2, "max_tokens": 3, "use_beam_search": True})
    assert chat.status_code == 200, chat.text
    (want_chat,) = server_oracle.beam_search([server_oracle.chat(messages, use_tqdm=False)[0].prompt_token_ids],
                                             BeamSearchParams(beam_width=2, max_tokens=3))
    got = [c["message"]["content"] for c in chat.json()["choices"]]
    start = len(want_chat.sequences[0].tokens) - 3
    assert got == [tok.decode(s.tokens[start:], skip_special_tokens=True) for s in want_chat.sequences]


def test_the_server_gives_each_beam_token_the_entry_it_was_ranked_by(srv, server_oracle: LLM) -> None:  # noqa: ANN001
    import httpx

    r = httpx.post(f"{srv.url}/v1/completions", timeout=120, json={
        "model": "tiny-rast", "prompt": "the cat sat on", "n": 2, "max_tokens": 3, "use_beam_search": True,
        "logprobs": 3, "return_tokens_as_token_ids": True})
    assert r.status_code == 200, r.text
    (want,) = server_oracle.beam_search(["the cat sat on"], BeamSearchParams(beam_width=2, max_tokens=3))
    for choice, beam in zip(r.json()["choices"], want.sequences):
        ids = beam.tokens[len(beam.tokens) - len(beam.logprobs):]
        lp = choice["logprobs"]
        assert lp["tokens"] == [f"token_id:{t}" for t in ids]
        assert lp["token_logprobs"] == [pytest.approx(e[t], abs=1e-6) for e, t in zip(beam.logprobs, ids)]
        for top, entry, t in zip(lp["top_logprobs"], beam.logprobs, ids):  # its own token, then the best 3
            best = sorted(entry.items(), key=lambda kv: -kv[1])[:3]
            assert top == {f"token_id:{k}": pytest.approx(v, abs=1e-6) for k, v in [(t, entry[t])] + best}

    # top_logprobs past the 2·n candidates widens each step's entry, not the candidates: the same beams
    messages = [{"role": "user", "content": "the cat"}]
    chat = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120, json={
        "model": "tiny-rast", "messages": messages, "n": 1, "max_tokens": 3, "use_beam_search": True,
        "logprobs": True, "top_logprobs": 5})
    assert chat.status_code == 200, chat.text
    prompt = server_oracle.chat(messages, use_tqdm=False)[0].prompt_token_ids
    (narrow,) = server_oracle.beam_search([prompt], BeamSearchParams(beam_width=1, max_tokens=3))
    (wide,) = server_oracle.beam_search([prompt], BeamSearchParams(beam_width=1, max_tokens=3, logprobs=5))
    assert wide.sequences[0].tokens == narrow.sequences[0].tokens
    content = chat.json()["choices"][0]["logprobs"]["content"]
    assert [len(c["top_logprobs"]) for c in content] == [5] * len(wide.sequences[0].logprobs)
    beam = wide.sequences[0]
    assert [c["logprob"] for c in content] == \
        [pytest.approx(e[t], abs=1e-6) for e, t in zip(beam.logprobs, beam.tokens[len(prompt):])]


@pytest.mark.parametrize("body, param", [
    ({"top_p": 0.5}, "top_p"), ({"presence_penalty": 0.5}, "presence_penalty"), ({"stream": True}, "stream"),
    ({"stop": ["x"]}, "stop"), ({"max_tokens": None}, "max_tokens"), ({"use_beam_search": False}, "length_penalty"),
])
def test_beam_search_refuses_what_it_would_not_honour(srv, body: dict, param: str) -> None:  # noqa: ANN001
    import httpx

    r = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny-rast", "prompt": "x", "n": 2, "max_tokens": 3,
                                                       "use_beam_search": True, "length_penalty": 1.0, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
