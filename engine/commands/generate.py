"""`rast generate`: decode one prompt and stream the text to the terminal as it is produced."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from rast_engine.commands import add_model_args, add_sampling_args, build_engine, read_chat_template, use_chat_template
from rast_engine.errors import RastError
from rast_engine.requests import render_conversation

DEFAULT_MAX_TOKENS = 256  # without --max-tokens or the generation config's max_new_tokens


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate from one prompt, streaming to the terminal",
                              description="Generate with RAST (or the large model alone) from one prompt.")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--chat-template", metavar="T", help="with --chat: this Jinja template, or a file holding one, "
                                                         "instead of the tokenizer's (base models often have none)")
    add_sampling_args(p)
    p.set_defaults(func=run)


def _params(args: argparse.Namespace, defaults: dict[str, Any]) -> Any:
    """The flags' SamplingParams; an omitted filter or --max-tokens takes the generation config's value
    (a default max_tokens grows to --min-tokens, as the server's does)."""
    from rast_engine import SamplingParams
    from rast_engine.generation_config import fill
    from rast_engine.logits_processors import load_processor

    chosen = fill(defaults, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                  repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens)
    chosen = {"max_tokens": DEFAULT_MAX_TOKENS, **chosen}
    if args.max_tokens is None:
        chosen["max_tokens"] = max(chosen["max_tokens"], args.min_tokens)
    return SamplingParams(**chosen, stop=args.stop, ignore_eos=args.ignore_eos,
                          seed=args.request_seed, min_tokens=args.min_tokens, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, plausibility_alpha=args.plausibility_alpha,
                          logits_processors=None if args.logits_processors is None else
                          [load_processor(name) for name in args.logits_processors], output_kind="delta")


def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise RastError("--prompt is empty")
    _params(args, {})  # bad flags fail before the models load
    if args.chat_template is not None and not args.chat:
        raise RastError("--chat-template goes with --chat")
    template = read_chat_template(args.chat_template)
    engine = build_engine(args)
    use_chat_template(engine, template)
    params = _params(args, engine.sampling_defaults)
    tok = engine.tokenizer
    if args.chat:
        if getattr(tok, "chat_template", None) is None:
            raise RastError(f"{args.model}: the tokenizer has no chat template; drop --chat")
        text = render_conversation(tok, [{"role": "user", "content": prompt}], "the prompt", add_generation_prompt=True)
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
