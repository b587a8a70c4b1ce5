"""The shipped toy triple through the engine: it loads (small and large vocab widths differ), and the
engine's accuracies for M and M + ΔR agree, within sampling noise, with the toy's own HF-based sampler
on the same problems — the independent oracle — while ΔR visibly moves M onto the careful path."""
from __future__ import annotations

from pathlib import Path

import torch

import rast_engine
from rast_engine.toy.evaluate import MAX_NEW_TOKENS, load_problems, score
from rast_engine.toy.task import is_careful, is_correct

ROOT = Path(rast_engine.__file__).resolve().parent / "assets" / "toy"
N_PROBLEMS, N_SAMPLES, LAM = 40, 4, 1.0


def _engine_score(llm, problems) -> tuple[float, float]:
    from rast_engine import SamplingParams

    # One seed per request: a shared seed would give every prompt the same random stream.
    params = [SamplingParams(n=N_SAMPLES, temperature=1.0, max_tokens=MAX_NEW_TOKENS, seed=100 + i)
              for i in range(len(problems))]
    outs = llm.generate([p.prompt for p in problems], params, use_tqdm=False)
    texts = [(p, c.text) for p, o in zip(problems, outs) for c in o.outputs]
    return (sum(is_correct(p, t) for p, t in texts) / len(texts),
            sum(is_careful(t) for _, t in texts) / len(texts))


def test_engine_reproduces_toy_table_on_subset() -> None:
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from rast_engine import LLM

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    problems = [p for _, p in load_problems(ROOT / "problems.jsonl")][:N_PROBLEMS]
    tok = AutoTokenizer.from_pretrained(str(ROOT / "small"))
    hf = {k: Qwen2ForCausalLM.from_pretrained(str(ROOT / k), dtype=torch.float32).eval()
          for k in ("large", "small_rl", "small")}
    total = N_PROBLEMS * N_SAMPLES
    # |p̂₁ − p̂₂| of two independent 160-sample estimates: 4 standard deviations at worst-case p = 0.5.
    tol = 4 * (2 * 0.25 / total) ** 0.5
    rates = {}
    for name, kwargs, members in (
        ("large", {}, [(hf["large"], 1.0)]),
        ("large+delta", {"small_rl": str(ROOT / "small_rl"), "small_base": str(ROOT / "small"), "lam": LAM},
         [(hf["large"], 1.0), (hf["small_rl"], LAM), (hf["small"], -LAM)]),
    ):
        llm = LLM(str(ROOT / "large"), device="cpu", dtype="float32", **kwargs)
        acc, careful = _engine_score(llm, problems)
        ref = score(members, tok, problems, n=N_SAMPLES, seed=0)
        assert abs(acc - ref.accuracy) < tol, (name, acc, ref.accuracy)
        assert abs(careful - ref.careful_rate) < tol, (name, careful, ref.careful_rate)
        rates[name] = careful
    # RL's behaviour transfers: the careful path goes from rare (~0.2) to dominant (~0.9).
    assert rates["large+delta"] > rates["large"] + 0.4
