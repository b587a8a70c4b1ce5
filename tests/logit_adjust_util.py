"""What the logit-adjustment tests share (test_logit_adjust.py, test_token_masks.py): the engine on a
tiny triple, and the oracle, HF transformers' forwards combined by Eq. 3 with the adjustments applied by
hand and by HF's own logits processors."""
from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, RepetitionPenaltyLogitsProcessor

from rast_engine import EngineConfig, LLMEngine, SamplingParams

LAM = 0.7
PROMPTS = [[5, 9, 9, 17, 4, 9], [33, 2, 70, 70]]
PENALTIES = dict(repetition_penalty=1.4, frequency_penalty=0.5, presence_penalty=-0.3)


@functools.lru_cache(maxsize=None)
def hf_model(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def stop_ids(triple: tuple, params: SamplingParams) -> list[int]:
    """The ids that end a sequence: stop_token_ids, and the model's EOS unless ignore_eos."""
    eos = AutoConfig.from_pretrained(str(triple[0])).eos_token_id
    return params.stop_token_ids + ([] if params.ignore_eos else [eos])


@torch.no_grad()
def oracle_logits(triple: tuple, ids: list[int], n_prompt: int, vocab: int, params: SamplingParams,
                  bad_ids: list[list[int]] | None = None) -> torch.Tensor:
    """[V] adjusted Eq. 3 logits for the token after ``ids``; ``bad_ids``: the token sequences of
    params.bad_words (tokenised by the caller), masked over the output only (vLLM's): a word's last
    token wherever the output ends with the rest of it. By hand, not HF's NoBadWordsLogitsProcessor:
    transformers <= 5.17 (the GPU image's) skips a word longer than the output, so its last token went
    unbanned right after its prefix was generated."""
    x = torch.tensor([ids])
    large, rl, base = (hf_model(p)(x).logits[0, -1, :vocab].float() for p in triple)
    z = large + LAM * (rl - base)
    if params.allowed_token_ids is not None:
        outside = torch.ones(vocab, dtype=torch.bool)
        outside[params.allowed_token_ids] = False
        z[outside] = float("-inf")
    output = ids[n_prompt:]
    for word in bad_ids or ():
        if len(word) == 1 or output[1 - len(word):] == word[:-1]:  # a shorter output is never equal
            z[word[-1]] = float("-inf")
    for token, bias in (params.logit_bias or {}).items():
        z[token] += bias
    if len(ids) - n_prompt < params.min_tokens:
        z[stop_ids(triple, params)] = float("-inf")
    z = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(x, z[None])[0]
    for token, count in Counter(output).items():
        z[token] -= params.frequency_penalty * count + params.presence_penalty
    return z


def make_engine(triple: tuple, **kw: object) -> LLMEngine:
    large, rl, base = map(str, triple)
    kw = {"kv_cache_blocks": 64, "max_model_len": 64, "device": "cpu", **kw}
    return LLMEngine(EngineConfig(large, rl, base, lam=LAM, dtype="float32", block_size=4, **kw))


def record_launches(engine: LLMEngine) -> list[bool]:
    """Whether each of the engine's launch-ahead attempts (async scheduling) launched a step."""
    launched, inner = [], engine._launch_ahead

    def counting(batch: object) -> object:
        out = inner(batch)
        launched.append(out is not None)
        return out

    engine._launch_ahead = counting
    return launched


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    done: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs
    return done


def oracle_greedy(triple: tuple, prompt: list[int], vocab: int, params: SamplingParams,
                  bad_ids: list[list[int]] | None = None) -> tuple[list[int], str]:
    ids, stops = list(prompt), set(stop_ids(triple, params))
    for _ in range(params.max_tokens):
        ids.append(int(oracle_logits(triple, ids, len(prompt), vocab, params, bad_ids).argmax()))
        if ids[-1] in stops:
            return ids[len(prompt):], "stop"
    return ids[len(prompt):], "length"
