"""`rast generate`: decode one prompt and stream the text to the terminal as it is produced."""
from __future__ import annotations

import argparse
import sys

from rast_engine.commands import add_model_args, add_sampling_args, build_engine
from rast_engine.errors import RastError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate from one prompt, streaming to the terminal",
                              description="Generate with RAST (or the large model alone) from one prompt.")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise RastError("--prompt is empty")
    from rast_engine import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            min_p=args.min_p, max_tokens=args.max_tokens, stop=args.stop,
                            ignore_eos=args.ignore_eos, seed=args.request_seed, min_tokens=args.min_tokens,
                            repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty, output_kind="delta")
    engine = build_engine(args)
    tok = engine.tokenizer
    if args.chat:
        if getattr(tok, "chat_template", None) is None:
            raise RastError(f"{args.model}: the tokenizer has no chat template; drop --chat")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
    else:
        ids = tok.encode(prompt)
    engine.add_request("generate-0", ids, params)
    finish = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            completion = out.outputs[0]
            sys.stdout.write(completion.text)
            sys.stdout.flush()
            finish = completion.finish_reason
    sys.stdout.write("\n")
    stats = engine.stats()
    print(f"[{stats.generation_tokens_total} tokens, finish: {finish}]", file=sys.stderr)
    return 0
