"""The ``rast`` command. Each subcommand lives in its own module, which exposes
``register(subparsers)``; modules keep heavy imports (torch, transformers) inside their run function
so ``rast --help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from rast_engine import __version__
from rast_engine.errors import NoAdmissibleToken, RastError

# (module, one-line purpose); the module's register() adds the subparser and its defaults(func=...).
SUBCOMMANDS: tuple[str, ...] = (
    "rast_engine.commands.generate",
    "rast_engine.server.cli",
    "rast_engine.server.batch_cli",
    "rast_engine.commands.bench",
    "rast_engine.evaluation.cli",
    "rast_engine.analysis.cli",
    "rast_engine.toy.demo",
)


class StrictParser(argparse.ArgumentParser):
    """No prefix abbreviations: `--model` must never be read as `--model-streams`, and a flag added later must
    not change what an old command line means. Subparsers inherit the class, so every level is strict."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = StrictParser(
        prog="rast",
        description="RAST decoding: a large base model steered by small RL-tuned deltas.",
    )
    parser.add_argument("--version", action="version", version=f"rast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (RastError, OSError, NoAdmissibleToken) as exc:  # a missing or misplaced file, or a request
        # whose own settings leave no token (plausibility_alpha 1 with min_tokens masking M's top token)
        print(f"rast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
