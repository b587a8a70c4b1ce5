"""``rast demo``: the shipped toy triple through the engine, on a CPU, in well under a minute.
Prints a few problems answered by M and by M + λ·ΔR side by side, then the accuracy table
(average pass@1 over a held-out subset) of S, R, M, M + λ·ΔR and the RL-tuned M."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "toy"
ROWS = ("small", "small_rl", "large", "large+delta", "large_rl")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="RAST on the shipped toy models (CPU, < 60 s)",
                              description="Run the shipped toy world (5-digit addition) through the engine.")
    p.add_argument("--problems", type=int, default=50, help="held-out problems to score (max 200)")
    p.add_argument("--n", type=int, default=2, help="samples per problem, temperature 1")
    p.add_argument("--lam", type=float, default=0.5, help="λ of M + λ·(R − S)")
    p.add_argument("--show", type=int, default=4, help="problems printed side by side")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the accuracies to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rast_engine import LLM, SamplingParams
    from rast_engine.errors import RastError
    from rast_engine.toy.evaluate import MAX_NEW_TOKENS, load_problems
    from rast_engine.toy.task import is_careful, is_correct

    if not 1 <= args.problems <= 200 or args.n < 1:
        raise RastError("--problems must be in [1, 200] and --n >= 1")
    t0 = time.time()
    problems = [p for _, p in load_problems(ASSETS / "problems.jsonl")][: args.problems]
    setups = {
        "small": (ASSETS / "small", {}),
        "small_rl": (ASSETS / "small_rl", {}),
        "large": (ASSETS / "large", {}),
        "large+delta": (ASSETS / "large", {"small_rl": str(ASSETS / "small_rl"),
                                           "small_base": str(ASSETS / "small"), "lam": args.lam}),
        "large_rl": (ASSETS / "large_rl", {}),
    }
    texts: dict[str, list[list[str]]] = {}
    for name in ROWS:
        path, extra = setups[name]
        llm = LLM(str(path), device=args.device, seed=args.seed, **extra)
        # One seed per request: a shared seed would give every prompt the same random stream.
        params = [SamplingParams(n=args.n, temperature=1.0, max_tokens=MAX_NEW_TOKENS, seed=args.seed * 100003 + i)
                  for i in range(len(problems))]
        outs = llm.generate([p.prompt for p in problems], params, use_tqdm=False)
        texts[name] = [[c.text for c in o.outputs] for o in outs]

    print(f"Toy RAST: 5-digit addition. '[' opens the careful carry-by-carry path. λ = {args.lam:g}\n")
    for i, p in enumerate(problems[: args.show]):
        print(f"{p.prompt}  (answer {p.answer})")
        for name in ("large", "large+delta"):
            t = texts[name][i][0]
            print(f"  {'M' if name == 'large' else 'M+ΔR':5s} {'✓' if is_correct(p, t) else '✗'} {t}")
    result = {}
    print(f"\n{'model':12s} {'acc':>6s} {'careful':>8s}   ({len(problems)} problems × {args.n} samples, T = 1)")
    for name in ROWS:
        flat = [(p, t) for p, ts in zip(problems, texts[name]) for t in ts]
        acc = sum(is_correct(p, t) for p, t in flat) / len(flat)
        careful = sum(is_careful(t) for _, t in flat) / len(flat)
        result[name] = acc
        print(f"{name:12s} {acc:6.3f} {careful:8.3f}")
    print(f"\n{time.time() - t0:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
