"""`rast eval` (sample, grade, score a benchmark) and `rast eval compare` (recovery-rate table)."""
from __future__ import annotations

import argparse
import json

from rast_engine.commands import lora_modules_arg
from rast_engine.config import KV_CACHE_DTYPES, QUANTIZATIONS
from rast_engine.errors import RastError

_DESCRIPTION = """Score a model (or RAST: --model plus --small-rl/--small-base) on a JSONL benchmark:
n samples per problem, every sample saved to OUT/samples.jsonl (a rerun resumes), metrics in
OUT/metrics.json (avg pass@1, pass@k, maj@k, mean length, reasoning words) and plots.
`rast eval compare BASE RAST RL` prints the recovery-rate table. See docs/eval.md."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="score a model or RAST on a math benchmark (pass@k, maj@k)",
                              description=_DESCRIPTION)
    p.add_argument("--model", help="the large base model M (or any single model)")
    p.add_argument("--small-rl", help="the small RL-tuned model R (a directory, or a LoRA adapter over --small-base)")
    p.add_argument("--small-base", help="R's small base model S")
    p.add_argument("--lam", type=float, default=1.0, help="λ, the strength of ΔR = R − S (default 1.0)")
    p.add_argument("--lams", type=float, nargs="+", default=None, metavar="LAM",
                   help="a λ sweep in one engine: each λ a run of its own in OUT/lam<λ>/ (with --lora-modules, "
                        "OUT/<name>-lam<λ>/), saved as a single run with that --lam saves it")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="RL models as LoRA adapters over --small-base (no --small-rl), evaluated in one engine: "
                        "each a run of its own in OUT/<name>/, saved as a single run with --small-rl PATH saves it")
    p.add_argument("--rl-checkpoints", nargs="+", default=None, metavar="DIR",
                   help="full checkpoints of R over --small-base (no --small-rl), evaluated one after another in "
                        "one engine that loads --model once: each a run of its own in OUT/<directory name>/, saved "
                        "as a single run with --small-rl DIR saves it")
    p.add_argument("--data", help="JSONL file with fields problem, answer and optional id")
    p.add_argument("--template", default="a",
                   help="a: the chat template + boxed instruction; b: 'Question: ... Answer: Let's think step "
                        "by step.'; or a file with an {input} placeholder (default a)")
    p.add_argument("--n", type=int, default=32, help="samples per problem (default 32)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--plausibility-alpha", type=float, default=0.0,
                   help="mask tokens the large model alone gives under this fraction of its top token's "
                        "probability (contrastive decoding's constraint; with --small-rl the large model's own "
                        "directory it is contrastive decoding; default 0: off)")
    p.add_argument("--logits-processors", nargs="+", default=None, metavar="NAME",
                   help="qualified names (pkg.module.fn) of logits processors run in order over each draw's "
                        "combined logits: fn(output_ids, logits) or fn(prompt_ids, output_ids, logits), and a "
                        "keyword `parts` for each model's logits (README; a sample setting)")
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-inflight", type=int,
                   help="problems in the engine at once (n samples each; default: about 512 samples' worth); "
                        "each is saved when it finishes")
    p.add_argument("--limit", type=int, help="only the first LIMIT problems")
    p.add_argument("--name", help="dataset name in metrics.json (default: the data file's stem)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--speculative-tokens", type=int, default=0, metavar="G",
                   help="speculative decoding, G drafts a round (default 0: off; needs --small-rl/--small-base)")
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="fp8: the large model's projections as FP8 weights (default: none)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="fp8: every model's KV cache in float8_e4m3fn (default auto: the model's dtype)")
    p.add_argument("--data-parallel-size", type=int, default=1, metavar="N",
                   help="N engines in processes of their own, worker r on GPU r (--device cpu: all on the CPU), "
                        "problems handed to whichever has room; the samples are the same for any N (default 1)")
    p.add_argument("--out", help="output folder (samples.jsonl, run.json, metrics.json, plots)")
    p.set_defaults(func=run)

    sub = p.add_subparsers(dest="eval_command", metavar="compare")
    c = sub.add_parser("compare", help="recovery rate per dataset as a Markdown table (paper Table 1)",
                       description="Each argument is a metrics.json or a folder of them; runs pair up by "
                                   "dataset name. RR = (acc_RAST − acc_base) / (acc_RL − acc_base).")
    c.add_argument("base", metavar="BASE")
    c.add_argument("rast", metavar="RAST")
    c.add_argument("rl", metavar="RL")
    c.set_defaults(func=run_compare)


def run(args: argparse.Namespace) -> int:
    missing = [f"--{k}" for k in ("model", "data", "out") if not getattr(args, k)]
    if missing:
        raise RastError(f"rast eval needs {', '.join(missing)} (or: rast eval compare BASE RAST RL)")
    from rast_engine.evaluation.runner import EvalConfig, run_eval
    from rast_engine.evaluation.variants import variants

    cfg = EvalConfig(model=args.model, data=args.data, out=args.out, small_rl=args.small_rl,
                     small_base=args.small_base, lam=args.lam, template=args.template, n=args.n,
                     temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                     max_tokens=args.max_tokens, stop=tuple(args.stop), device=args.device, dtype=args.dtype,
                     seed=args.seed, max_inflight=args.max_inflight, limit=args.limit, name=args.name,
                     plots=not args.no_plots, speculative_tokens=args.speculative_tokens,
                     quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                     plausibility_alpha=args.plausibility_alpha, data_parallel_size=args.data_parallel_size,
                     logits_processors=None if args.logits_processors is None else tuple(args.logits_processors),
                     lams=None if args.lams is None else tuple(args.lams),
                     lora_modules=lora_modules_arg(args.lora_modules),
                     rl_checkpoints=None if args.rl_checkpoints is None else tuple(args.rl_checkpoints))
    m = run_eval(cfg)
    keys = ("dataset", "num_problems", "n", "avg_pass@1", "avg_pass@1_stderr", "pass@k", "maj@k",
            "mean_response_tokens")
    if variants(cfg) is None:
        print(json.dumps({k: m[k] for k in keys}, indent=2))
    else:
        print(json.dumps({name: {k: r[k] for k in keys} for name, r in m.items()}, indent=2))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from rast_engine.evaluation.compare import compare_table

    print(compare_table(args.base, args.rast, args.rl))
    return 0
