"""One engine drawing a run's samples (`rast eval`): up to max_inflight problems in flight, each request's
samples handed on the moment it finishes. A request's seed is a function of (seed, problem id, its first
sample index), so a problem draws the same samples whatever engine, batch or resume it lands in."""
from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any, Callable

from rast_engine.evaluation.data import Problem
from rast_engine.evaluation.grading import extract_answer, is_equivalent
from rast_engine.evaluation.templates import load_template

if TYPE_CHECKING:
    from rast_engine.evaluation.runner import EvalConfig


def request_seed(seed: int, problem_id: str, done: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(problem_id.encode()) * 131 + done) % (1 << 62)


def _build_llm(cfg: "EvalConfig") -> Any:
    from rast_engine import LLM

    rl = cfg.rl_checkpoints[0] if cfg.rl_checkpoints else cfg.small_rl  # a sweep's others replace its weights
    return LLM(cfg.model, rl, cfg.small_base, lam=cfg.lam, device=cfg.device, dtype=cfg.dtype,
               seed=cfg.seed, speculative_tokens=cfg.speculative_tokens, quantization=cfg.quantization,
               kv_cache_dtype=cfg.kv_cache_dtype, lora_modules=cfg.lora_modules)


def _records(problem: Problem, first_index: int, out: Any) -> list[dict[str, Any]]:
    recs = []
    for j, comp in enumerate(out.outputs):
        answer = extract_answer(comp.text)
        recs.append({"id": problem.id, "index": first_index + j, "answer": answer, "truth": problem.answer,
                     "correct": is_equivalent(answer, problem.answer), "num_tokens": len(comp.token_ids),
                     "finish_reason": comp.finish_reason, "text": comp.text})
    return recs


# a problem, the requests (first index, count) it needs, and the run's variant they are for (variants.py;
# 0 in a single run)
Item = tuple[Problem, list[tuple[int, int]], int]


def sample(cfg: "EvalConfig", next_item: Callable[[], Item | None],
           emit: Callable[[int, list[dict[str, Any]]], None]) -> None:
    """Keeps up to max_inflight problems in one engine, taking each from ``next_item`` (None: no more) and
    handing each request's records to ``emit`` (with its variant) the moment it finishes, so a long
    straggler neither idles the batch nor holds back the saving of the others. With rl_checkpoints, an item
    of another checkpoint than R's loaded one waits until the engine has drained, then R's weights are
    replaced (the items come one checkpoint's after another: runner.run_eval)."""
    from rast_engine import SamplingParams
    from rast_engine.evaluation.variants import variants
    from rast_engine.logits_processors import load_processor

    # per variant, its requests' λ (None: the engine's), adapter and RL directory
    runs = [(v.lam, v.lora, v.small_rl) for v in variants(cfg) or []] or [(None, None, cfg.small_rl)]
    loaded = cfg.rl_checkpoints[0] if cfg.rl_checkpoints else cfg.small_rl
    held: list[Item] = []  # at most one: the item that waits for the engine to drain before its R loads

    template = load_template(cfg.template)
    stop = list(template.stop) + list(cfg.stop)
    processors = None if cfg.logits_processors is None else [load_processor(n) for n in cfg.logits_processors]
    llm = _build_llm(cfg)
    engine = llm.llm_engine
    tokenizer = llm.get_tokenizer()
    inflight: dict[str, tuple[Problem, int, int]] = {}
    open_requests: dict[tuple[int, str], int] = {}  # per (variant, problem) in flight

    def submit() -> None:
        nonlocal loaded
        item = held.pop() if held else next_item()
        if item is None:
            return
        problem, parts, v = item
        lam, lora, rl = runs[v]
        if cfg.rl_checkpoints and rl != loaded:
            if inflight:
                held.append(item)
                return
            llm.load_weights(path=rl)
            loaded = rl
        prompt = template.render(problem.problem, tokenizer)
        for first, count in parts:
            params = SamplingParams(n=count, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                    min_p=cfg.min_p, max_tokens=cfg.max_tokens, stop=stop or None,
                                    plausibility_alpha=cfg.plausibility_alpha, lam=lam, logits_processors=processors,
                                    seed=request_seed(cfg.seed, problem.id, first), output_kind="final_only")
            rid = f"eval-{v}-{problem.id}-{first}"
            engine.add_request(rid, prompt, params, lora_request=lora)
            inflight[rid] = (problem, first, v)
        open_requests[v, problem.id] = len(parts)

    while True:
        if not inflight:  # at the start, and when a checkpoint's last problem ended with the next one's held
            for _ in range(cfg.max_inflight):
                submit()
            if not inflight:
                return
        for out in engine.step():
            if not out.finished or out.request_id not in inflight:
                continue
            problem, first, v = inflight.pop(out.request_id)
            emit(v, _records(problem, first, out))
            open_requests[v, problem.id] -= 1
            if not open_requests[v, problem.id]:  # the problem is done: the next one enters
                del open_requests[v, problem.id]
                submit()
