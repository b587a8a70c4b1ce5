"""`rast run-batch`: an OpenAI Batch API file answered offline, as vLLM's `run-batch`."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from typing import IO, Any, Iterator

from rast_engine.commands import add_model_args, build_engine, read_chat_template, require_model, use_chat_template
from rast_engine.errors import RastError
from rast_engine.server.cli import add_engine_server_args, build_server, check_engine_server_args, configure_logging

logger = logging.getLogger(__name__)

_DESCRIPTION = """Answer a JSONL file of OpenAI Batch API requests ({"custom_id", "method": "POST", "url":
"/v1/chat/completions" or "/v1/completions", "body"}) with the handlers of `rast serve`, in process, and write
one result line for each ({"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}), in
the input's order, as vLLM's run-batch. A line that fails gets its error in its own result line; the others
go on. The requests run concurrently, so the engine batches them."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run-batch", help="answer an OpenAI Batch API file offline", description=_DESCRIPTION)
    p.add_argument("-i", "--input-file", required=True, metavar="PATH", help="the requests, JSONL ('-': stdin)")
    p.add_argument("-o", "--output-file", required=True, metavar="PATH",
                   help="where the results go, JSONL, one line as each is ready in order ('-': stdout)")
    add_model_args(p)
    add_engine_server_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require_model(args)
    check_engine_server_args(args)
    if _same_file(args.input_file, args.output_file):
        raise RastError("--output-file must differ from --input-file: it is written while the input is read")
    configure_logging(args)
    template = read_chat_template(args.chat_template)
    with _opened(args.input_file, "rb", sys.stdin.buffer) as src, _opened(args.output_file, "w", sys.stdout) as dst:
        engine = build_engine(args)
        use_chat_template(engine, template)
        from rast_engine.server.run_batch import run_batch

        server = build_server(args, engine)

        def write(line: str) -> None:
            dst.write(line + "\n")
            dst.flush()

        summary = asyncio.run(run_batch(server, src, write))
    print(f"rast run-batch: {summary.lines} requests, {summary.succeeded} answered, {summary.failed} failed "
          f"(each with its error in its line), {summary.completion_tokens} tokens generated in "
          f"{summary.seconds:.1f} s", file=sys.stderr)
    if summary.engine_error is not None:
        raise RastError(f"the engine failed during the batch: {summary.engine_error!r}")
    return 0


def _same_file(a: str, b: str) -> bool:
    """Whether the two paths name one file, however spelled (a link, ./, an absolute path)."""
    if a == "-" or b == "-":
        return False
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


@contextlib.contextmanager
def _opened(path: str, mode: str, std: IO[Any]) -> Iterator[IO[Any]]:
    """The file at ``path`` (text in UTF-8; the input is read as bytes, so a line that is not UTF-8 fails
    alone), or ``std`` for '-'; opened before the models load, so a bad path fails fast."""
    if path == "-":
        yield std
        return
    with open(path, mode, encoding=None if "b" in mode else "utf-8") as f:
        yield f
