"""Speculative RAST decoding on the shipped toy triple: tokens/s and draft acceptance against plain decoding.

    python bench/speculative.py            # table, and bench/results/speculative-<device>-<sha>.json
    python bench/speculative.py --quick    # smoke run: batch 1, γ 0 and 2, a few short requests

The toy triple (engine/assets/toy, docs/toy.md) is the one triple here with trained weights, so its drafts
are accepted as a trained pair's would be on its task (random weights say nothing about acceptance: the
tests' random models reject nearly every draft, the dummy loader's near-uniform logits pass nearly all).
Its models are tiny (M 20.6 MB, the pair 6.4 MB in float32): a step costs its launches and host work, not
its weight reads, so these figures say what a round costs against a plain step where nothing is
memory-bound, not what a 7B + Δ1.5B triple would gain (`rast analyze accept` bounds that from the
weight bytes). Per row: the requests' generated tokens over the wall time of LLM.generate (one warm-up
first), the drafts accepted over those made, and the speed-up over γ = 0 at the same batch, for both
methods (draft "small"). Sampling: the toy's evaluation settings (T = 1, λ = 0.5), one seed per request:
the coupled rows decode the plain row's very tokens, the rejection rows others from the same distribution.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402

TOY = common.ROOT / "engine" / "assets" / "toy"


def prompts(count: int) -> list[str]:
    template = (TOY / "template.txt").read_text()
    lines = (TOY / "problems.jsonl").read_text().splitlines()[:count]
    return [template.replace("{input}", json.loads(line)["problem"]) for line in lines]


def measure(device: torch.device, batch: int, gamma: int, method: str, texts: list[str], max_tokens: int) -> dict:
    rast = common.import_engine()
    llm = rast.LLM(str(TOY / "large"), str(TOY / "small_rl"), str(TOY / "small"), lam=0.5, device=str(device),
                   dtype="float32", max_num_seqs=batch, speculative_tokens=gamma, speculative_method=method)
    params = [rast.SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=i) for i in range(len(texts))]
    llm.generate(texts[:batch], params[:batch], use_tqdm=False)  # warm-up
    before = llm.llm_engine.stats()
    common.sync(device)
    t0 = time.perf_counter()
    outs = llm.generate(texts, params, use_tqdm=False)
    common.sync(device)
    seconds = time.perf_counter() - t0
    stats = llm.llm_engine.stats()
    drafted = stats.spec_draft_tokens_total - before.spec_draft_tokens_total
    accepted = stats.spec_accepted_tokens_total - before.spec_accepted_tokens_total
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return dict(batch=batch, gamma=gamma, method=method if gamma else None, requests=len(texts), tokens=tokens,
                seconds=seconds, tokens_per_s=tokens / seconds, acceptance=accepted / drafted if drafted else None)


def main() -> None:
    args = common.quick_args(__doc__, "smoke run: batch 1, γ 0 and 2, 4 requests of 16 tokens")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(2)
    grid = [(1, [0, 2])] if args.quick else [(1, [0, 2, 4, 6]), (16, [0, 2, 4, 6])]
    requests, max_tokens = (4, 16) if args.quick else (None, 64)
    rows = []
    for batch, gammas in grid:
        texts = prompts(requests or 4 * batch)
        for gamma in gammas:
            for method in (["coupled"] if gamma == 0 or args.quick else ["coupled", "rejection"]):
                rows.append(measure(device, batch, gamma, method, texts, max_tokens))
                base = next(r for r in rows if r["batch"] == batch and r["gamma"] == 0)
                rows[-1]["speedup"] = rows[-1]["tokens_per_s"] / base["tokens_per_s"]
    print(f"speculative RAST, toy triple | {common.device_name(device)} | commit {common.git_sha()}")
    print(common.table(rows, ["batch", "gamma", "method", "tokens", "seconds", "tokens_per_s", "acceptance", "speedup"]))
    if common.keeps_results(args.out, device, args.quick):
        path = common.write_results("speculative", device, rows, dict(triple="engine/assets/toy", lam=0.5), args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
