"""`rast serve`: the OpenAI-compatible HTTP server. Binds loopback unless --host says otherwise."""
from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import socket
from typing import Any

from rast_engine.commands import add_model_args, build_engine, read_chat_template, require_model, use_chat_template
from rast_engine.errors import RastError
from rast_engine.server import MAX_REQUEST_BYTES, checked_api_key
from rast_engine.config import SCHEDULING_POLICIES
from rast_engine.reasoning import PARSERS
from rast_engine.server.tools import PARSERS as TOOL_PARSERS

logger = logging.getLogger(__name__)

_DESCRIPTION = """Serve RAST decoding over the OpenAI API: GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (stream: true for server-sent events), POST /tokenize and /detokenize (vLLM's),
GET /health, GET /metrics (Prometheus).
Requests may set OpenAI's presence_penalty, frequency_penalty and logit_bias and vLLM's extra fields top_k,
min_p, repetition_penalty, allowed_token_ids, bad_words, min_tokens, stop_token_ids, ignore_eos,
include_stop_str_in_output and skip_special_tokens, and lam (λ for this request: a number, or a list of
one per small pair). Omitted sampling fields take the generation config's values (--generation-config)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server for RAST decoding",
                              description=_DESCRIPTION)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on the /v1 and tokenizer routes (default: "
                        "$RAST_API_KEY, else vLLM's $VLLM_API_KEY; an empty variable counts as unset)")
    p.add_argument("--queue-timeout", type=float, default=None,
                   help="seconds a request may wait for its first token before a 503 (default: no limit)")
    p.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                   help="largest request body accepted; a larger one gets 413 before it is read "
                        f"(default {MAX_REQUEST_BYTES >> 20} MiB)")
    p.add_argument("--responses-store-size", type=int, default=1000, metavar="N",
                   help="responses of /v1/responses kept in memory for previous_response_id and GET, the least "
                        "recently used forgotten first; 0 stores none (default 1000)")
    add_engine_server_args(p)
    p.set_defaults(func=run)


def add_engine_server_args(p: argparse.ArgumentParser) -> None:
    """The flags of what serves requests, shared by `rast serve` and `rast run-batch`."""
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the model names clients may send, as vLLM's: responses carry the first (default: "
                        "the MODEL path)")
    p.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="as vLLM's: usage gives prompt_tokens_details.cached_tokens, the prompt tokens read from "
                        "the prefix cache (/v1/responses always gives them)")
    p.add_argument("--logits-processor-pattern", metavar="REGEX", default=None,
                   help="as vLLM V0's: a request's logits_processors may name (qualified module.attribute "
                        "names) only what the whole of REGEX matches; without it the field is refused")
    p.add_argument("--max-waiting", type=int, default=512,
                   help="requests allowed to wait beyond --max-num-seqs; more get 429 (run-batch sends no "
                        "more) (default 512)")
    p.add_argument("--chat-template", metavar="T", help="the chat template of /v1/chat/completions and /tokenize: "
                   "a Jinja template or a file holding one (default: the tokenizer's; base models often have none)")
    p.add_argument("--reasoning-parser", choices=PARSERS, default=None,
                   help="as vLLM's: chat responses give the <think>...</think> text as message.reasoning and the "
                        "answer as content, and structured outputs hold the answer only; deepseek_r1 "
                        "(DeepSeek-R1, its distills, QwQ) or qwen3 (default: none)")
    p.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES, default="fcfs",
                   help="as vLLM's: fcfs, or priority (a request's priority field, lower first; the running "
                        "request last in that order is preempted first) (default fcfs)")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="as vLLM's: LoRA adapters over --small-base, each an RL model a request picks by naming "
                        "it as its model (NAME=PATH, or vLLM's JSON {\"name\": ..., \"path\": ...}); give "
                        "--small-base and no --small-rl (default: none)")
    p.add_argument("--enable-lora", action="store_true",
                   help="as vLLM's: LoRA slots over --small-base even without --lora-modules (--max-loras, default "
                        "1), for adapters loaded while serving")
    p.add_argument("--max-loras", type=int, default=None, metavar="N",
                   help="as vLLM's: LoRA slots, adapters held at once; above the --lora-modules count, more load "
                        "while serving (/v1/load_lora_adapter with $VLLM_ALLOW_RUNTIME_LORA_UPDATING=true) "
                        "(default: the --lora-modules count)")
    p.add_argument("--max-lora-rank", type=int, default=None, metavar="R",
                   help="as vLLM's: the largest adapter rank a slot holds (default: the --lora-modules' largest, "
                        "else 16)")
    p.add_argument("--max-cpu-loras", type=int, default=None, metavar="N",
                   help="as vLLM's: adapters kept in host memory once read, so an evicted one reloads without "
                        "reading its files (default: --max-loras)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="as vLLM's: chat requests with tools may let the model choose its calls (tool_choice "
                        "\"auto\", the default with tools); needs --tool-call-parser")
    p.add_argument("--tool-call-parser", choices=TOOL_PARSERS, default=None,
                   help="how calls are read from the output for \"auto\": hermes (<tool_call> JSON blocks, the "
                        "format of Qwen2.5's and Qwen3's templates)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def run(args: argparse.Namespace) -> int:
    require_model(args)  # before the port is bound; whether the directory exists is build_engine's
    if not 0 < args.port < 65536:
        raise RastError(f"--port must be in 1..65535, got {args.port}")
    if args.queue_timeout is not None and not 0 < args.queue_timeout < math.inf:
        raise RastError(f"--queue-timeout must be a positive number of seconds, got {args.queue_timeout}")
    if args.max_request_bytes < 1:
        raise RastError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    check_engine_server_args(args)
    api_key = _api_key(args.api_key)
    configure_logging(args)
    # bound before the models load, and by us: uvicorn logs a bind error and exits 3 itself
    template = read_chat_template(args.chat_template)
    socks = _listen(args.host, args.port)
    try:
        engine = build_engine(args)
        use_chat_template(engine, template)
        import uvicorn

        server = build_server(args, engine, api_key=api_key, queue_timeout=args.queue_timeout,
                              max_request_bytes=args.max_request_bytes, responses_store_size=args.responses_store_size)
        for sock in socks:  # uvicorn logs no address for sockets it is given
            host, port = sock.getsockname()[:2]
            logger.info("rast serve: listening on http://%s:%d", f"[{host}]" if ":" in host else host, port)
        uvicorn.Server(uvicorn.Config(server.app(), log_level=args.log_level)).run(sockets=socks)
    finally:
        for sock in socks:
            sock.close()
    return 0


def check_engine_server_args(args: argparse.Namespace) -> None:
    if args.max_waiting < 0:
        raise RastError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if args.enable_auto_tool_choice and args.tool_call_parser is None:  # vLLM's rule
        raise RastError("--enable-auto-tool-choice needs --tool-call-parser (hermes)")


def configure_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build_server(args: argparse.Namespace, engine: Any, **kw: Any) -> Any:
    """The OpenAIServer over ``engine`` that add_engine_server_args' flags describe."""
    from rast_engine.server.app import OpenAIServer

    return OpenAIServer(engine, model_name=args.served_model_name or args.model, max_waiting=args.max_waiting,
                        tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
                        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
                        logits_processor_pattern=args.logits_processor_pattern, **kw)


def _api_key(flag: str | None) -> str | None:
    """--api-key, else the first of $RAST_API_KEY and $VLLM_API_KEY that is set and not empty (a
    deployment moved from vLLM keeps its authentication)."""
    if flag is not None:
        return checked_api_key(flag, "--api-key")
    for name in ("RAST_API_KEY", "VLLM_API_KEY"):
        if os.environ.get(name):
            return checked_api_key(os.environ[name], f"${name}")
    return None


def _listen(host: str, port: int) -> list[socket.socket]:
    """A listening socket on every address ``host`` resolves to ("" or a wildcard: every interface), as
    asyncio's create_server binds them for uvicorn.run: an address family the kernel lacks, or an address
    no interface has (localhost's ::1 on a loopback without IPv6), is skipped; any other failure, or no
    address bound at all, is an error."""
    socks: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        skipped: list[OSError] = []
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:  # EAFNOSUPPORT: no IPv6 in this kernel
                skipped.append(exc)
                continue
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not a listening port: only TIME_WAIT
            if family == socket.AF_INET6:  # beside an IPv4 socket on the same port
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise
                skipped.append(exc)
                socks.pop().close()
                continue
            sock.listen(2048)
        if not socks:
            raise skipped[0] if skipped else OSError(f"{host!r} resolves to no address")
    except (OSError, UnicodeError) as exc:  # port in use, unknown host, a malformed name (idna)
        for sock in socks:
            sock.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise RastError(f"cannot listen on {host}:{port}: {reason}") from None
    return socks
