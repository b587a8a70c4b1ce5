"""The engine end to end on tiny random triples, against HF transformers as the oracle.

Eq. 3 oracle: z = logits_M[:, :V] + λ (logits_R[:, :V] - logits_S[:, :V]) from HF forwards over the
whole sequence. Sampled tokens are checked by replaying rast_sample on the oracle's logits with the
seed/offset the engine promises (sample_seed(request seed, index), offset = tokens generated so far).
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import rast_kernels
from rast_engine import LLM, EngineConfig, LLMEngine, SamplingParams
from rast_engine.errors import RastError
from rast_engine.sampling_params import sample_seed

LAM = 0.7
PROMPTS = ["the cat sat on", "what is the answer? let us think", "3 + 5 =", "a small model can steer a large"]


@functools.lru_cache(maxsize=None)
def hf_model(path: Path) -> torch.nn.Module:
    """HF's eager attention, the reference: transformers 5.17 (the GPU image's) gave Gemma 2 SDPA by
    default, which leaves out its attention soft cap; newer versions refuse SDPA for it."""
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


@torch.no_grad()
def hf_eq3(triple: tuple, ids: list[int], lam: float, vocab: int, small: bool = True) -> torch.Tensor:
    """[L, V] Eq. 3 logits of every position of ids (row t scores token t + 1)."""
    x = torch.tensor([ids])
    z = hf_model(triple[0])(x).logits[0, :, :vocab].float()
    if small:
        z = z + lam * (hf_model(triple[1])(x).logits[0, :, :vocab] - hf_model(triple[2])(x).logits[0, :, :vocab])
    return z


def hf_greedy(triple: tuple, prompt: list[int], lam: float, vocab: int, steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(hf_eq3(triple, ids, lam, vocab)[-1].argmax()))
    return ids[len(prompt):]


def hf_sampled(triple: tuple, prompt: list[int], lam: float, vocab: int, steps: int, seed: int,
               params: SamplingParams) -> list[int]:
    """The engine's promise: the same draws from the same distribution with the same noise."""
    ids = list(prompt)
    for t in range(steps):
        z = hf_eq3(triple, ids, lam, vocab)[-1:]
        ids.append(int(rast_kernels.rast_sample(z, temperature=params.temperature, top_k=params.top_k,
                                                top_p=params.top_p, min_p=params.min_p, seed=seed, offset=t,
                                                backend="torch")[0]))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def llm(qwen2_triple: tuple) -> LLM:
    large, rl, base = qwen2_triple
    return LLM(str(large), str(rl), str(base), lam=LAM, block_size=4, kv_cache_blocks=128, seed=7)


GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def test_step_logits_equal_hf_eq3(llm: LLM, qwen2_triple: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    runner, steps = llm.llm_engine.runner, []
    forward, launch = runner.forward_logits, runner.launch

    def capture_launch(seqs, is_prefill, copies, draws, feed=None, lookahead=0):  # noqa: ANN001, ANN202
        steps.append([list(s.token_ids) for s in seqs])
        return launch(seqs, is_prefill, copies, draws, feed, lookahead)

    def capture_forward(inputs, rows, outs=None):  # noqa: ANN001, ANN202
        out = forward(inputs, rows, outs)
        steps[-1] = (steps[-1], [t.clone() for t in out])
        return out

    monkeypatch.setattr(runner, "launch", capture_launch)
    monkeypatch.setattr(runner, "forward_logits", capture_forward)
    llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    V = llm.llm_engine.vocab_size
    assert len(steps) == 8 and all(len(seqs) == 2 for seqs, _ in steps)  # one prefill, seven decodes
    for seqs, (large, rl, base) in steps:
        combined = large[:, :V] + LAM * (rl[:, :V] - base[:, :V])
        for b, ids in enumerate(seqs):
            torch.testing.assert_close(combined[b], hf_eq3(qwen2_triple, ids, LAM, V)[-1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "olmo2", "olmo3", "gemma3", "gemma2", "qwen3_moe",
                                  "mixtral"])
def test_greedy_equals_hf_reference_loop(arch: str, request: pytest.FixtureRequest) -> None:
    triple = request.getfixturevalue(f"{arch}_triple")
    llm = LLM(*map(str, triple), lam=LAM, block_size=4, kv_cache_blocks=64)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for out in outs:
        ref = hf_greedy(triple, out.prompt_token_ids, LAM, llm.llm_engine.vocab_size, GREEDY.max_tokens)
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == "length"
    assert llm.llm_engine.stats().kv_blocks_used == 0


def _hf_generate(path: Path, prompt: list[int], steps: int, eos: int, vocab: int) -> list[int]:
    """HF greedy generate, with the padded columns past the tokenizer suppressed (the engine's V)."""
    model = hf_model(path)
    x = torch.tensor([prompt])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=steps, do_sample=False,
                         pad_token_id=model.config.pad_token_id,
                         suppress_tokens=list(range(vocab, model.config.vocab_size)))[0, len(prompt):].tolist()
    return out[:out.index(eos) + 1] if eos in out else out


def test_lambda_zero_and_base_alone_equal_hf_generate(qwen2_triple: tuple) -> None:
    large, rl, base = map(str, qwen2_triple)
    params = SamplingParams(temperature=0.0, max_tokens=10)
    for llm in (LLM(large, rl, base, lam=0.0, kv_cache_blocks=64), LLM(large, kv_cache_blocks=64)):
        eos = llm.get_tokenizer().eos_token_id
        for out in llm.generate(PROMPTS, params, use_tqdm=False):
            assert out.outputs[0].token_ids == _hf_generate(qwen2_triple[0], out.prompt_token_ids, 10, eos,
                                                                   llm.llm_engine.vocab_size)


def test_batch_composition_and_preemption_keep_greedy_outputs(llm: LLM, qwen2_triple: tuple) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    together = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert together == alone
    tiny = LLM(*map(str, qwen2_triple), lam=LAM, block_size=4, kv_cache_blocks=10)  # 40 slots for ~80 tokens
    squeezed = [o.outputs[0].token_ids for o in tiny.generate(PROMPTS, params, use_tqdm=False)]
    assert tiny.llm_engine.scheduler.num_preemptions > 0
    assert squeezed == alone
    assert tiny.llm_engine.stats().kv_blocks_used == 0


def test_n_samples_share_prompt_blocks_and_match_seeded_oracle(llm: LLM, qwen2_triple: tuple) -> None:
    engine = llm.llm_engine
    params = SamplingParams(n=3, temperature=1.0, top_k=20, max_tokens=5, seed=11, ignore_eos=True)
    engine.add_request("fork", PROMPTS[0], params)  # 9 tokens: 2 full blocks + a partial one (copy-on-write)
    first = engine.step()
    seqs = engine.groups["fork"].seqs
    assert seqs[0].num_prompt_tokens % engine.config.block_size != 0  # the last prompt block is partial
    assert len(seqs) == 3 and len(first[0].outputs) == 3
    shared = seqs[0].block_table
    assert all(s.block_table == shared for s in seqs)
    assert all(engine.block_manager.ref_counts[b] == 3 for b in shared)
    assert engine.stats().kv_blocks_used == len(shared)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    assert final is not None and final.finished
    assert engine.stats().kv_blocks_used == 0  # copy-on-write blocks and the shared prompt all freed
    prompt = final.prompt_token_ids
    for comp in final.outputs:
        ref = hf_sampled(qwen2_triple, prompt, LAM, engine.vocab_size, 5, sample_seed(11, comp.index), params)
        assert comp.token_ids == ref
    assert len({tuple(c.token_ids) for c in final.outputs}) > 1


def test_seeded_sampling_is_batch_invariant(llm: LLM, qwen2_triple: tuple) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=6, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=9, seed=s) for s in (1, 2)] + [GREEDY]
    mixed = llm.generate([PROMPTS[2], PROMPTS[0], PROMPTS[1], PROMPTS[3]],
                         [others[0], params, others[1], others[2]], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    prompt = mixed[1].prompt_token_ids
    assert alone == hf_sampled(qwen2_triple, prompt, LAM, llm.llm_engine.vocab_size, 6, sample_seed(1234, 0), params)


def test_prefix_cache_hits_keep_outputs(qwen2_triple: tuple) -> None:
    config = EngineConfig(model=str(qwen2_triple[0]), small_rl=str(qwen2_triple[1]),
                          small_base=str(qwen2_triple[2]), lam=LAM, block_size=4, kv_cache_blocks=64)
    engine = LLMEngine(config)
    prompt = engine.tokenizer.encode(PROMPTS[1])
    longer = prompt + engine.tokenizer.encode(" step by step")

    cached: dict[str, set] = {}

    def run(rid: str, ids: list[int]) -> list[int]:
        engine.add_request(rid, ids, GREEDY)
        out = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                cached.setdefault(rid, set()).add(out.num_cached_tokens)
        return out.outputs[0].token_ids

    run("a", prompt)
    hits = engine.block_manager.prefix_hits
    second = run("b", longer)
    assert engine.block_manager.prefix_hits - hits == len(prompt) // 4
    # vLLM's num_cached_tokens: the full blocks of the first prompt, which the second one starts with
    assert cached == {"a": {0}, "b": {len(prompt) // 4 * 4}} and len(prompt) >= 4
    assert second == hf_greedy(qwen2_triple, longer, LAM, engine.vocab_size, GREEDY.max_tokens)
    assert engine.stats().kv_blocks_used == 0


def test_request_lam_overrides_engine_lam(llm: LLM, qwen2_triple: tuple) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, lam=-0.5)
    out = llm.generate([PROMPTS[2]], params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(qwen2_triple, out.prompt_token_ids, -0.5, llm.llm_engine.vocab_size, 6)


def test_stop_strings_and_stop_token_ids(llm: LLM) -> None:
    base = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    text = base.text
    stop = text[5:8]
    assert len(text) > 10 and stop.strip()
    engine = llm.llm_engine
    engine.add_request("s", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                       stop=[stop, "never-there"]))
    seen = []
    while engine.has_unfinished_requests():
        seen += [o.outputs[0].text for o in engine.step()]
    assert seen[-1] == text[:text.find(stop)]
    assert all(stop not in s and seen[-1].startswith(s) for s in seen)  # streamed text never shows it
    tok = base.token_ids[3]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                    stop_token_ids=[tok]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[:base.token_ids.index(tok) + 1] and out.finish_reason == "stop"


def test_logprobs_are_those_of_the_sampling_distribution(llm: LLM, qwen2_triple: tuple) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=4, seed=5, logprobs=3, ignore_eos=True)
    out = llm.generate([PROMPTS[3]], params, use_tqdm=False)[0]
    comp = out.outputs[0]
    ids = list(out.prompt_token_ids)
    total = 0.0
    for tok, entry in zip(comp.token_ids, comp.logprobs):
        ref = torch.log_softmax(hf_eq3(qwen2_triple, ids, LAM, llm.llm_engine.vocab_size)[-1], dim=-1)
        assert entry[tok] == pytest.approx(float(ref[tok]), abs=1e-4)
        top = ref.topk(3)
        assert set(top.indices.tolist()) <= set(entry)
        total += float(ref[tok])
        ids.append(tok)
    assert comp.cumulative_logprob == pytest.approx(total, abs=1e-3)


def test_score_equals_hf(llm: LLM, qwen2_triple: tuple) -> None:
    seqs = [llm.get_tokenizer().encode(PROMPTS[0]), llm.get_tokenizer().encode(PROMPTS[3])]
    V = llm.llm_engine.vocab_size
    for output in ("logits", "logprobs"):
        for ids, res in zip(seqs, llm.score(seqs, output=output)):
            x = torch.tensor([ids])
            with torch.no_grad():
                ref = [hf_model(p)(x).logits[0, :, :V] for p in qwen2_triple]
            comb = ref[0] + LAM * (ref[1] - ref[2])
            if output == "logprobs":
                ref, comb = [torch.log_softmax(t, -1) for t in ref], torch.log_softmax(comb, -1)
            assert res.large.shape == (len(ids), V) and res.large.dtype == torch.float32
            torch.testing.assert_close(res.large, ref[0], atol=1e-4, rtol=0)
            torch.testing.assert_close(res.deltas[0][0], ref[1], atol=1e-4, rtol=0)
            torch.testing.assert_close(res.deltas[0][1], ref[2], atol=1e-4, rtol=0)
            torch.testing.assert_close(res.combined, comb, atol=1e-4, rtol=0)
    assert llm.llm_engine.stats().kv_blocks_used == 0


def test_add_request_rejects_bad_input_without_side_effects(llm: LLM) -> None:
    engine = llm.llm_engine
    engine.add_request("dup", PROMPTS[0], GREEDY)
    before = (engine.stats(), dict(engine.groups), list(engine.scheduler.waiting))
    too_long = [5] * engine.max_model_len
    cases = [("e1", "", GREEDY), ("e2", [], GREEDY), ("e3", too_long, GREEDY), ("e4", [5, 1000], GREEDY),
             ("e5", [5, -1], GREEDY), ("dup", PROMPTS[1], GREEDY), ("e6", PROMPTS[0], {"n": 1})]
    for rid, prompt, params in cases:
        with pytest.raises(RastError):
            engine.add_request(rid, prompt, params)
    assert (engine.stats(), dict(engine.groups), list(engine.scheduler.waiting)) == before
    engine.step()
    engine.abort_request("dup")
    engine.abort_request("never-added")
    assert not engine.has_unfinished_requests() and engine.stats().kv_blocks_used == 0


def test_llm_passes_engine_arguments_through(qwen2_triple: tuple) -> None:
    large, rl, base = map(str, qwen2_triple)
    llm = LLM(large, rl, base, kv_cache_blocks=64, max_num_batched_tokens=8, enable_prefix_caching=False,
              async_output=True)
    cfg = llm.llm_engine.config
    assert (cfg.max_num_batched_tokens, cfg.enable_prefix_caching, llm.llm_engine.async_output) == (8, False, True)
    out = llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
    with pytest.raises(RastError, match="unknown LLM argument.*max_batch_size"):
        LLM(large, max_batch_size=4)
