"""SamplingParams.logits_processors (engine/logits_processors.py): vLLM V0's per-request callables over the
combined logits, and rast's ``parts`` keyword.

Oracles: HF transformers' Eq. 3 logits (test_engine.hf_eq3) with the same processors applied, then argmax
(greedy) or the sampler spec with the same seed and offset (sampled: the same draws); HF's greedy decoding
of the large model alone for a processor that returns it; exact probabilities for the logprobs."""
from __future__ import annotations

import math
import os

import pytest
import torch

import rast_kernels
from rast_engine import LLM, RastParts, SamplingParams
from rast_engine.errors import RastError, RequestFailed
from rast_engine.sampling_params import sample_seed
from test_engine import LAM, PROMPTS, hf_eq3


def no_repeat(output_ids: list[int], z: torch.Tensor) -> torch.Tensor:
    """No token twice in a row: a function of the output so far."""
    z = z.clone()
    if output_ids:
        z[output_ids[-1]] = -math.inf
    return z


def favour_prompt(prompt_ids: list[int], output_ids: list[int], z: torch.Tensor) -> torch.Tensor:
    """The prompt's tokens raised, more as the output grows: reads all three arguments."""
    return z.index_add(0, torch.tensor(prompt_ids, device=z.device),
                       torch.full((len(prompt_ids),), 0.5 + 0.25 * len(output_ids), device=z.device))


@pytest.fixture(scope="module")
def llm(qwen2_triple: tuple) -> LLM:
    large, rl, base = qwen2_triple
    return LLM(str(large), str(rl), str(base), lam=LAM, block_size=4, kv_cache_blocks=128, seed=7)


def _oracle(triple: tuple, prompt: list[int], vocab: int, steps: int, seed: int | None) -> list[int]:
    ids = list(prompt)
    for t in range(steps):
        out = ids[len(prompt):]
        z = favour_prompt(prompt, out, no_repeat(out, hf_eq3(triple, ids, LAM, vocab)[-1]))
        if seed is None:
            ids.append(int(z.argmax()))
        else:
            ids.append(int(rast_kernels.rast_sample(z[None], seed=sample_seed(seed, 0), offset=t, backend="torch")[0]))
    return ids[len(prompt):]


@pytest.mark.parametrize("seed", [None, 11])
def test_processors_run_in_order_over_the_combined_logits(llm: LLM, qwen2_triple: tuple, seed: int | None) -> None:
    tok, vocab = llm.get_tokenizer(), llm.llm_engine.vocab_size
    params = SamplingParams(temperature=0.0 if seed is None else 1.0, seed=seed, max_tokens=6, ignore_eos=True,
                            logits_processors=[no_repeat, favour_prompt])
    outs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = tok.encode(prompt)
        assert out.outputs[0].token_ids == _oracle(qwen2_triple, ids, vocab, 6, seed)


def test_output_ids_are_the_tokens_so_far_with_steps_launched_ahead(qwen2_triple: tuple) -> None:
    large, rl, base = qwen2_triple
    ahead = LLM(str(large), str(rl), str(base), lam=LAM, block_size=4, kv_cache_blocks=128, seed=7,
                async_output=True, async_scheduling=True)
    seen: list[list[int]] = []

    def record(output_ids: list[int], z: torch.Tensor) -> torch.Tensor:
        seen.append(list(output_ids))
        return z
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=5, ignore_eos=True)
    plain = ahead.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0].token_ids
    got = ahead.generate([PROMPTS[1]], SamplingParams(temperature=1.0, seed=3, max_tokens=5, ignore_eos=True,
                                                      logits_processors=[record]), use_tqdm=False)
    assert got[0].outputs[0].token_ids == plain  # an identity processor changes no draw
    assert seen == [plain[:t] for t in range(5)]


def test_parts_hand_a_processor_each_models_logits(llm: LLM, qwen2_triple: tuple) -> None:
    tok, vocab = llm.get_tokenizer(), llm.llm_engine.vocab_size
    seen: list[tuple[torch.Tensor, RastParts]] = []

    def large_alone(output_ids: list[int], z: torch.Tensor, *, parts: RastParts) -> torch.Tensor:
        seen.append((z.clone(), parts))
        return parts.large
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logits_processors=[large_alone])
    out = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    prompt = tok.encode(PROMPTS[0])
    ids = list(prompt)
    for _ in range(5):  # the large model's own greedy decoding over the engine's vocabulary
        ids.append(int(hf_eq3(qwen2_triple, ids, LAM, vocab, small=False)[-1].argmax()))
    assert out.outputs[0].token_ids == ids[len(prompt):]
    for z, parts in seen:  # z is Eq. 3 of the parts, and the parts are float32 [V]
        ((rl, base),) = parts.deltas
        assert parts.weights == [LAM] and parts.large.dtype == torch.float32 and parts.large.shape == (vocab,)
        torch.testing.assert_close(z, parts.large + LAM * (rl - base), rtol=0, atol=1e-5)


def test_logprobs_are_those_of_the_processed_distribution(llm: LLM) -> None:
    def two_tokens(output_ids: list[int], z: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(z, -math.inf)
        out[5], out[9] = 0.0, math.log(3.0)  # p = 1/4, 3/4
        return out
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, logprobs=1, n=8, seed=2,
                            logits_processors=[two_tokens])
    (out,) = llm.generate([PROMPTS[2]], params, use_tqdm=False)
    want = {5: math.log(0.25), 9: math.log(0.75)}
    for sample in out.outputs:
        assert set(sample.token_ids) <= {5, 9}
        for t, entry in zip(sample.token_ids, sample.logprobs):
            assert entry[t] == pytest.approx(want[t], abs=1e-5) and entry[9] == pytest.approx(want[9], abs=1e-5)


@pytest.mark.parametrize("fns, says", [
    (len, "must be a list"), ([3], "must be callable"), ([lambda z: z], "1 required positional"),
    ([lambda a, b, c, d: d], "4 required positional"), ([max], "cannot be read")])
def test_bad_processors_are_refused_naming_the_field(fns: object, says: str) -> None:
    with pytest.raises(RastError, match=says) as err:
        SamplingParams(logits_processors=fns)
    assert err.value.param == "logits_processors"


@pytest.mark.parametrize("fn, cause, says", [
    (lambda o, z: z[:-1], RastError, r"logits_processors\[0\] must return a floating tensor of shape"),
    (lambda o, z: z.long(), RastError, "torch.int64"),
    (lambda o, z: 1 / 0, ZeroDivisionError, "ZeroDivisionError")])
def test_a_failing_processor_fails_its_request_and_leaves_the_engine_serving(llm: LLM, fn, cause: type,  # noqa: ANN001
                                                                             says: str) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    before = llm.generate(PROMPTS[:2], greedy, use_tqdm=False)
    with pytest.raises(RequestFailed, match=says) as err:
        llm.generate([PROMPTS[0], PROMPTS[1]], [greedy, SamplingParams(max_tokens=4, logits_processors=[fn])],
                     use_tqdm=False)
    assert isinstance(err.value.__cause__, cause) and len(err.value.request_ids) == 1
    assert err.value.param == "logits_processors"
    assert not llm.llm_engine.groups  # LLM.generate aborted both
    after = llm.generate(PROMPTS[:2], greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in after] == [o.outputs[0].token_ids for o in before]


def test_speculative_rounds_refuse_processors(qwen2_triple: tuple) -> None:
    large, rl, base = qwen2_triple
    spec = LLM(str(large), str(rl), str(base), lam=LAM, block_size=4, kv_cache_blocks=64, speculative_tokens=2)
    with pytest.raises(RastError, match="speculative rounds") as err:
        spec.generate([PROMPTS[0]], SamplingParams(max_tokens=2, logits_processors=[no_repeat]), use_tqdm=False)
    assert err.value.param == "logits_processors"


def delta_where_uncertain(threshold: float):  # noqa: ANN201
    """README's example, at a threshold of entropy (nats) that the tiny models' steps straddle."""
    def gate(output_ids: list[int], z: torch.Tensor, *, parts: RastParts) -> torch.Tensor:
        entropy = -(parts.large.log_softmax(-1).exp() * parts.large.log_softmax(-1)).nansum()
        return z if entropy > threshold else parts.large
    return gate


def test_the_readme_gate_steers_where_the_large_model_is_unsure(llm: LLM, qwen2_triple: tuple) -> None:
    vocab, steered, threshold = llm.llm_engine.vocab_size, [], 3.95
    (out,) = llm.generate([PROMPTS[3]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                       logits_processors=[delta_where_uncertain(threshold)]),
                          use_tqdm=False)
    ids = list(out.prompt_token_ids)
    for _ in range(8):
        large = hf_eq3(qwen2_triple, ids, LAM, vocab, small=False)[-1]
        entropy = -(large.softmax(-1) * large.log_softmax(-1)).sum()
        steered.append(bool(entropy > threshold))
        ids.append(int((hf_eq3(qwen2_triple, ids, LAM, vocab)[-1] if steered[-1] else large).argmax()))
    assert out.outputs[0].token_ids == ids[len(out.prompt_token_ids):]
    assert any(steered) and not all(steered), steered  # both branches taken


def test_processed_steps_replay_the_forward_and_sample_eagerly_under_the_cuda_emulator(
        qwen2_triple: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path on the CPU (tests/cuda_emulator.py): a batch holding a processed request replays the
    forward's graph on two streams, then runs the processors and samples eagerly, and is not launched
    ahead (its processors read the output on the host, which a capture or a step ahead could not give
    them). Tokens equal the synchronous eager engine's; the emulator's race and host-sync checks pass."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU runs only (Triton interpreter)")
    from cuda_emulator import emulated_cuda
    from fast_path_util import prompts
    from test_emulated_fast_path import SAMPLED, first_samples, install_fast_path, record_ahead, triton_engine

    processed = SamplingParams(temperature=0.9, max_tokens=3, seed=7, ignore_eos=True,
                               logits_processors=[no_repeat, delta_where_uncertain(3.95)])
    batch, params = prompts(3, seed=6), [SAMPLED, processed, SAMPLED]
    want = first_samples(triton_engine(qwen2_triple, stack_small_models=False), batch, params)
    engine = triton_engine(qwen2_triple, async_output=True)
    ahead = record_ahead(engine)
    with emulated_cuda(monkeypatch) as emu:
        install_fast_path(engine.runner)
        got = first_samples(engine, batch, params)
    assert got == want
    # two decode steps held the processed request (its forward's graph alone), the last one neither
    assert emu.replays == 2 * 1 + 2 * (SAMPLED.max_tokens - 1 - 2)
    assert True not in ahead  # no step was launched ahead of a batch holding it


@pytest.mark.gpu
def test_processors_on_gpu_equal_cpu_float32(qwen2_triple: tuple) -> None:
    """Processors over CUDA logits (graphs, two streams, async output): greedy tokens equal the CPU's."""
    from fast_path_util import generate, make_engine, prompts

    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True,
                            logits_processors=[no_repeat, favour_prompt, delta_where_uncertain(3.95)])
    cpu = make_engine(qwen2_triple, "cpu", dtype="float32")
    gpu = make_engine(qwen2_triple, "cuda", dtype="float32", attention_backend="triton", async_output=True,
                      async_scheduling=True)
    batch = prompts(4, seed=62)
    assert generate(gpu, batch, params) == generate(cpu, batch, params)
    assert gpu._in_flight is None and gpu.block_manager.num_used_blocks == 0
