"""`rast analyze pcr | kld | cosine`: the paper's Sec. 2.1 / 4.1 / 4.2 analyses on the engine;
`rast analyze accept`: whether speculative decoding with the small models as the draft would pay."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from rast_engine.errors import RastError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="JSONL file with fields problem, answer and optional id")
    p.add_argument("--template", default="a", help="a, b or a template file with {input} (default a)")
    p.add_argument("--max-tokens", type=int, default=1024, help="trajectory length cap (default 1024)")
    p.add_argument("--limit", type=int, help="only the first LIMIT problems (the paper used 50)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the full report (per trajectory) to this JSON file")


def _triple(p: argparse.ArgumentParser) -> None:
    """The flags of an analysis of M~ = M + λ·(R − S)."""
    p.add_argument("--model", required=True, help="the large base model M")
    p.add_argument("--small-rl", required=True)
    p.add_argument("--small-base", required=True)
    p.add_argument("--lam", type=float, default=1.0)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("analyze", help="path coverage rate, token KLD, ΔR cosine similarity, draft "
                                              "acceptance",
                              description="Teacher-forced analyses of RAST (see docs/eval.md).")
    sub = p.add_subparsers(dest="analysis", metavar="ANALYSIS")
    sub.required = True

    pcr = sub.add_parser("pcr", help="path coverage rate (Eq. 2): the base model's argmax on RL greedy paths")
    pcr.add_argument("--rl", required=True, help="the RL-tuned model whose greedy paths are covered")
    pcr.add_argument("--base", required=True, help="the base model that is teacher-forced along them")
    pcr.add_argument("--small-rl", help="score with M~ = base + λ·(small RL − small base) instead")
    pcr.add_argument("--small-base")
    pcr.add_argument("--lam", type=float, default=1.0)
    pcr.add_argument("--top", type=int, default=20, help="how many most-missed tokens to list")
    _common(pcr)
    pcr.set_defaults(func=run)

    kld = sub.add_parser("kld", help="per-token KL(M~ ‖ M_base) along M~'s own paths; the top tokens")
    _triple(kld)
    kld.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy paths")
    kld.add_argument("--top", type=int, default=20, help="how many top positions and tokens to list")
    kld.add_argument("--html", metavar="FILE", help="also write the paper's Fig. 5 view: each path's text, every "
                                                    "token shaded by its KLD")
    _common(kld)
    kld.set_defaults(func=run)

    cos = sub.add_parser("cosine", help="mean cosine similarity of two ΔR along a model's greedy paths")
    cos.add_argument("--model", required=True, help="the model whose greedy paths are scored (paper: the "
                                                    "large RL model)")
    cos.add_argument("--delta", nargs=2, action="append", metavar=("RL", "BASE"), required=True,
                     help="a small RL model and its base; give exactly two")
    _common(cos)
    cos.set_defaults(func=run)

    acc = sub.add_parser("accept", help="acceptance of the small models' drafts by M~ (speculative decoding), "
                                        "per draft and method")
    _triple(acc)
    acc.add_argument("--temperature", type=float, default=1.0, help="of M~'s paths, target and drafts (default 1)")
    acc.add_argument("--top-p", type=float, default=0.95, help="likewise (default 0.95, the paper's)")
    acc.add_argument("--max-gamma", type=int, default=8, help="draft lengths 1..MAX_GAMMA (default 8)")
    _common(acc)
    acc.set_defaults(func=run)


def _summary(args: argparse.Namespace, report: dict[str, Any]) -> str:
    n = f"{report['num_trajectories']} trajectories, {report['num_tokens']} tokens"
    if args.analysis == "pcr":
        lines = [f"PCR (mean over trajectories): {100 * report['pcr']:.2f}%  "
                 f"(pooled over tokens: {100 * report['token_pcr']:.2f}%; scorer: {report['scorer']}; {n})"]
        if report["most_missed_tokens"]:
            lines += ["", "| RL token the scorer missed | count |", "|---|---:|"]
            lines += [f"| {json.dumps(r['token'])} | {r['count']} |" for r in report["most_missed_tokens"]]
        return "\n".join(lines)
    if args.analysis == "kld":
        lines = [f"mean KL(M~ ‖ M_base) per token: {report['mean_kld']:.4f} ({n})", "",
                 "| token | count | mean KLD | max KLD |", "|---|---:|---:|---:|"]
        lines += [f"| {json.dumps(r['token'])} | {r['count']} | {r['mean_kld']:.4f} | {r['max_kld']:.4f} |"
                  for r in report["top_tokens"]]
        return "\n".join(lines)
    if args.analysis == "accept":
        lines = [f"draft acceptance by M~ (λ {report['lam']}, T {report['temperature']}, top-p {report['top_p']}; {n}); "
                 "speed-up: a bound from weight bytes, not a measurement", "",
                 "| draft / method | mean α | best γ | tokens / round | speed-up bound |", "|---|---:|---:|---:|---:|"]
        for name, d in report["drafts"].items():
            best = d["by_gamma"][d["best_gamma"] - 1]
            lines.append(f"| {name} | {d['mean_acceptance']:.3f} | {d['best_gamma']} | "
                         f"{best['tokens_per_round']:.2f} | {best['speedup_bound']:.2f}x |")
        return "\n".join(lines)
    return f"mean cosine similarity of the two ΔR: {report['mean_cosine']:.4f} ({n})"


def _writable(out: str, flag: str = "--out") -> Path:
    """An output file checked before the analysis runs (decoding and scoring may take hours), its folder made."""
    path = Path(out)
    if path.is_dir():
        raise RastError(f"{flag} {out!r} is a directory; give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)  # an OSError (a file in the way) is a one-line error
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise RastError(f"{flag} {out!r} is not writable")
    return path


def run(args: argparse.Namespace) -> int:
    out = _writable(args.out) if args.out else None
    page = _writable(args.html, "--html") if getattr(args, "html", None) else None
    if args.analysis == "pcr":
        from rast_engine.analysis.pcr import PcrConfig, run_pcr

        report = run_pcr(PcrConfig(rl=args.rl, base=args.base, data=args.data, small_rl=args.small_rl,
                                   small_base=args.small_base, lam=args.lam, template=args.template,
                                   max_tokens=args.max_tokens, limit=args.limit, device=args.device,
                                   dtype=args.dtype, seed=args.seed, top=args.top))
    elif args.analysis == "kld":
        from rast_engine.analysis.kld import KldConfig, run_kld

        report = run_kld(KldConfig(model=args.model, small_rl=args.small_rl, small_base=args.small_base,
                                   data=args.data, lam=args.lam, template=args.template,
                                   max_tokens=args.max_tokens, temperature=args.temperature, limit=args.limit,
                                   device=args.device, dtype=args.dtype, seed=args.seed, top=args.top))
    elif args.analysis == "cosine":
        from rast_engine.analysis.cosine import CosineConfig, run_cosine

        report = run_cosine(CosineConfig(model=args.model, deltas=[tuple(d) for d in args.delta], data=args.data,
                                         template=args.template, max_tokens=args.max_tokens, limit=args.limit,
                                         device=args.device, dtype=args.dtype, seed=args.seed))
    elif args.analysis == "accept":
        from rast_engine.analysis.accept import AcceptConfig, run_accept

        report = run_accept(AcceptConfig(model=args.model, small_rl=args.small_rl, small_base=args.small_base,
                                         data=args.data, lam=args.lam, temperature=args.temperature,
                                         top_p=args.top_p, max_gamma=args.max_gamma, template=args.template,
                                         max_tokens=args.max_tokens, limit=args.limit, device=args.device,
                                         dtype=args.dtype, seed=args.seed))
    else:
        raise RastError(f"unknown analysis {args.analysis!r}")
    print(_summary(args, report))
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if page is not None:
        from rast_engine.analysis.kld_html import write_kld_html

        write_kld_html(report, page)
    return 0
