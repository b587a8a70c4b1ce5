"""One timed generation in each system the decode suite compares, a profile of a few engine steps, and a
speculative row's projection to trained acceptance rates (spec_round).

Our engine is driven through its public API (add_request / step); the peer is three HF transformers models,
each with its own DynamicCache, run one after another per step with the RAST combination and top-p sampling
in torch, as proxy-tuning and the RAST repository's HF path do it. Every step ends in a device synchronize
and is timed on the host clock, so host overhead counts as a user sees it.
"""
from __future__ import annotations

import statistics
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from bench import common
from bench.common import sync

LAM = 1.0  # λ of the single small pair in every RAST mode
SPEC_GAMMA = 4
SPEC_ALPHAS = (0.6, 0.7, 0.8, 0.9)  # acceptance rates a round's time is projected at


def summarize(step_s: list[float], first_token_s: float, batch: int, gen: int) -> dict:
    """Decode figures from the per-step wall times of the steps after the one that produced first tokens."""
    if not step_s:
        raise RuntimeError("no decode steps were timed; use --gen >= 2")
    total = sum(step_s)
    return dict(tokens_per_s=batch * len(step_s) / total, step_ms=1e3 * total / len(step_s),
                step_ms_median=1e3 * statistics.median(step_s),
                step_ms_p90=1e3 * sorted(step_s)[int(0.9 * (len(step_s) - 1))], step_ms_max=1e3 * max(step_s),
                step_max_at=step_s.index(max(step_s)),
                ttft_ms=1e3 * first_token_s, decode_steps=len(step_s), generated_per_seq=gen)


def add_requests(engine: Any, sp_cls: Any, batch: int, prompt: int, gen: int, vocab: int, tag: str,
                 loras: Sequence[Optional[str]] = (None,)) -> None:
    """``batch`` random prompts, distinct within the batch and from every other tag's (no prefix-cache
    hits), sampled at T=1, top-p 0.95, no early stop; request i with adapter loras[i % len(loras)]."""
    rng = torch.Generator().manual_seed(zlib.crc32(f"{tag}/{batch}/{prompt}/{gen}".encode()))
    params = sp_cls(temperature=1.0, top_p=0.95, ignore_eos=True, max_tokens=gen)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", torch.randint(0, vocab, (prompt,), generator=rng).tolist(), params,
                           lora_request=loras[i % len(loras)])


def engine_generate(engine: Any, sp_cls: Any, batch: int, prompt: int, gen: int, vocab: int, tag: str,
                    device: torch.device, loras: Sequence[Optional[str]] = (None,)) -> dict:
    """Add ``batch`` random prompts at once and step the engine to the end; the step that hands every
    request its first token is the prefill (TTFT), the rest are decode steps."""
    add_requests(engine, sp_cls, batch, prompt, gen, vocab, tag, loras)
    sync(device)
    start, have_first, first_at, step_s, made, peak = time.perf_counter(), set(), 0.0, [], {}, 0
    t1 = start
    while engine.has_unfinished_requests():
        # no device sync between steps: with async_output the next batch runs while step() returns, so
        # a step is the interval between consecutive returns, and the intervals add up to the wall time
        t0 = t1
        outs = engine.step()
        t1 = time.perf_counter()
        peak = max(peak, engine.stats().kv_blocks_used)
        fresh = {o.request_id for o in outs} - have_first
        if fresh:  # still in prefill: some request got its first token in this step
            have_first |= fresh
            first_at = t1 - start
        elif len(have_first) == batch:
            step_s.append(t1 - t0)
        for o in outs:
            made[o.request_id] = len(o.outputs[0].token_ids)
    short = {r: n for r, n in made.items() if n != gen}
    if len(made) != batch or short:
        raise RuntimeError(f"{tag}: expected {batch} requests x {gen} tokens, got {len(made)} requests, "
                           f"short ones {dict(list(short.items())[:3])}")
    sync(device)
    return {**summarize(step_s, first_at, batch, gen), "kv_blocks_used_peak": peak}


def first_token_ms(first: float, repeat: Callable[[int], dict], repeats: int) -> dict:
    """TTFT as the median of the timed run's (``first``, ms) and ``repeats`` more prefills of fresh
    prompts (``repeat(i)``: a run of two tokens): one prefill is one sample, which a stray stall decides."""
    runs = [first] + [repeat(i)["ttft_ms"] for i in range(repeats)]
    return dict(ttft_ms=statistics.median(runs), ttft_ms_runs=runs)


def hf_load(cfg_dirs: list[Path], dtype: torch.dtype, device: torch.device) -> list[Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    models = []
    for d in cfg_dirs:
        with torch.device(device):
            m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(d)), dtype=dtype,
                                                 attn_implementation="sdpa")
        models.append(m.eval())
    return models


def output_heads(engine: Any) -> list[torch.Tensor]:
    """The output-projection weights of the engine's forwards, each storage once: a model's lm_head weight,
    a stacked pair's one [2, V, H] tensor, or the one head a LoRA adapter's model shares with its base
    (stacked, an expanded view of it)."""
    heads: dict[int, torch.Tensor] = {}
    for u in engine.runner.units:
        w = u.lm_head if isinstance(u.lm_head, torch.Tensor) else u.lm_head.weight
        w = w[0] if w.dim() == 3 and w.stride(0) == 0 else w
        heads.setdefault(w.untyped_storage().data_ptr(), w)
    return list(heads.values())


def peak_logits(heads: list[torch.Tensor], std: float) -> None:
    """Scale output-projection weights in place so that random models give logits of standard deviation
    ``std``. Dummy weights are N(0, DUMMY_STD) behind a final RMSNorm of unit weight (as HF's init), so
    their logits have std DUMMY_STD * sqrt(hidden), about 1.2 at Qwen2.5's widths: near uniform (about
    11 nats), where top-p 0.95 keeps two thirds of the vocabulary and the fused sampler must take its
    full-row fallback every step. At std 5 a row has 2-4 nats, like an LM's. A tied head scales the
    embedding with it, which the first RMSNorm undoes."""
    from rast_engine.models.loader import DUMMY_STD

    with torch.no_grad():
        for w in heads:
            w.mul_(std / (DUMMY_STD * w.shape[-1] ** 0.5))


def hf_combine_sample(logits: list[torch.Tensor], vocab: int, gen: torch.Generator, top_p: float = 0.95,
                      temperature: float = 1.0) -> torch.Tensor:
    """proxy-tuning's step: z_M + λ(z_R − z_S) over the shared vocab, temperature, top-p, one draw."""
    z = logits[0][:, :vocab].float() + LAM * (logits[1][:, :vocab].float() - logits[2][:, :vocab].float())
    probs = torch.softmax(z / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    pick = torch.multinomial(sorted_p, 1, generator=gen)
    return order.gather(-1, pick)


@torch.inference_mode()
def hf_generate(models: list[Any], batch: int, prompt: int, gen: int, vocab: int, device: torch.device) -> dict:
    rng = torch.Generator(device=device).manual_seed(batch * 1000 + prompt)
    ids = torch.randint(0, vocab, (batch, prompt), generator=rng, device=device)
    sync(device)
    start = time.perf_counter()
    outs = [m(input_ids=ids, use_cache=True, logits_to_keep=1) for m in models]  # each makes its own cache
    caches = [o.past_key_values for o in outs]
    tok = hf_combine_sample([o.logits[:, -1] for o in outs], vocab, rng)
    sync(device)
    first_at, step_s = time.perf_counter() - start, []
    for _ in range(gen - 1):
        t0 = time.perf_counter()
        outs = [m(input_ids=tok, past_key_values=c, use_cache=True) for m, c in zip(models, caches)]
        tok = hf_combine_sample([o.logits[:, -1] for o in outs], vocab, rng)
        del outs  # the logits of the step before are dead once sampled
        sync(device)
        step_s.append(time.perf_counter() - t0)
    got = caches[0].get_seq_length()
    if got != prompt + gen - 1:
        raise RuntimeError(f"hf-rast: cache holds {got} tokens, expected {prompt + gen - 1}")
    return summarize(step_s, first_at, batch, gen)


# ---- where the time goes --------------------------------------------------------------------------
def profile_engine(engine: Any, sp_cls: Any, batch: int, prompt: int, vocab: int, device: torch.device,
                   steps: int = 5, top: int = 15, tokens_per_step: int = 1) -> dict:
    """torch.profiler over ``steps`` decode steps (after the prefill and one warm decode step): the top
    kernels (ops on CPU) by self time per step, next to the step's wall time; under ``prefill`` the same
    for the step that prefills the prompts (the device side of the time to first token). ``tokens_per_step``:
    the most one step can yield (a speculative round's γ + 1), so the requests outlast the profiled steps
    where the context allows."""
    gen = min((steps + 3) * tokens_per_step, engine.max_model_len - prompt)
    add_requests(engine, sp_cls, batch, prompt, gen, vocab, "profile")
    prefill = common.device_profile(engine.step, device, 1, top)
    engine.step()
    prof = common.device_profile(engine.step, device, steps, top)
    while engine.has_unfinished_requests():
        engine.step()
    return dict(batch=batch, steps=steps, **prof, prefill=prefill)


def print_profile(p: dict) -> None:
    print(f"\nprofile {p['pairing']} {p['mode']} batch {p['batch']}: wall {p['wall_ms_per_step']:.3f} ms/step, "
          f"busy {p['busy_ms_per_step']:.3f} ms/step ({p['time_kind']}), "
          f"{p['launches_per_step']:.0f} kernels (CPU: ops) per step")
    print(common.table(p["kernels"], ["name", "ms_per_step", "share", "calls_per_step"]), flush=True)
    pre = p["prefill"]
    print(f"the prefill step: wall {pre['wall_ms_per_step']:.3f} ms, busy {pre['busy_ms_per_step']:.3f} ms, "
          f"{pre['launches_per_step']:.0f} kernels (CPU: ops)")
    print(common.table(pre["kernels"], ["name", "ms_per_step", "share", "calls_per_step"]), flush=True)


def spec_round(res: dict, stats: Any, batch: int, gen: int) -> dict:
    """A speculative row: its steps are rounds, its roofline a round's bytes (M once, the pair γ + 1
    times). The measured tokens/s follows the dummy weights' acceptance (``spec_acceptance``: their
    near-uniform logits pass most drafts), which says nothing about a trained triple; but a round drafts
    and verifies γ tokens whatever is accepted, so its time gives the throughput at a trained triple's
    acceptance α: batch x E_γ(α) tokens a round, E_γ(α) = (1 - α^(γ+1)) / (1 - α) for independent
    acceptances (`rast analyze accept` measures α on the checkpoints)."""
    round_s, g = res["step_ms"] / 1e3, SPEC_GAMMA
    drafted = stats.spec_draft_tokens_total
    return dict(tokens_per_s=batch * (gen - 1) / (round_s * res["decode_steps"]), spec_gamma=g,
                spec_acceptance=stats.spec_accepted_tokens_total / drafted if drafted else None,
                projected_tokens_per_s={str(a): batch * (1 - a ** (g + 1)) / (1 - a) / round_s for a in SPEC_ALPHAS})
