"""Serving latency and throughput through the OpenAI API, as a client sees them: time to first token,
time per output token, inter-token latency, request and token throughput, at a request rate or a
concurrency.

    python bench/serving.py --url http://127.0.0.1:8000 --model rast-32b     # a running rast (or vLLM) server
    python bench/serving.py                                                 # rast's server on the toy triple
    python bench/serving.py --toy --quick                                   # smoke run (CI)

Any OpenAI-compatible server takes the same load (vLLM's too: point --url at it, serving the same large
model, for a side-by-side on one machine). Each request is a streamed /v1/completions call with a text
prompt of --input-len words, ``ignore_eos`` and ``max_tokens`` = --output-len, so every request makes
exactly that many tokens (checked against the server's usage). Arrivals are Poisson at --rate (seeded; inf
sends them all at once), at most --concurrency in flight. Per row: the medians and p99 of TTFT (arrival to
the first token's chunk; arrival is when the request is sent, once one of the --concurrency slots
is free), TPOT ((E2E - TTFT) / (tokens - 1)) and ITL (gaps between chunks), and the
output tokens per second over the run's wall time.

The floor a decode step can reach is bench/decode.py's roofline for the same pairing at a batch of about
the concurrency (weights and KV bytes over measured copy bandwidth); TPOT above it is what serving adds
(scheduling, prefills of arriving requests, HTTP). A client on the same host measures its own event loop
too: keep it off the server's cores where that matters. --toy runs the server in this process on the
shipped toy triple (engine/assets/toy): a smoke of the whole path, not a figure for real models.
Timing needs text in the stream: a server whose models have no tokenizer (bench/decode.py's random-weight
pairings) streams no chunk until a request ends, so real shapes are measured here by serving a checkpoint
(`rast serve ...`) and giving --url; bench/decode.py times random-weight pairings without HTTP.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402

WORDS = ("the cat sat on the mat and we add the two numbers then check the result again so the answer is "
         "what a small model can steer").split()


def _prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def _one(client: Any, url: str, body: dict, arrival: float) -> dict:
    """One streamed request: its chunk times (perf_counter) and the server's usage."""
    times: list[float] = []
    usage = None
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code, "error": (await r.aread()).decode()[:300]}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                times.append(time.perf_counter())
    return {"ok": True, "arrival": arrival, "times": times, "end": time.perf_counter(), "usage": usage}


async def _load(url: str, model: str, requests: int, rate: float, concurrency: int, input_len: int,
                output_len: int, seed: int) -> tuple[list[dict], float]:
    import httpx

    rng = random.Random(seed)
    # every request's prompt and arrival drawn before the load starts: the seed alone fixes them, whatever
    # order the event loop runs the sends in
    bodies, delays, t = [], [], 0.0
    for i in range(requests):
        bodies.append({"model": model, "prompt": _prompt(rng, input_len), "max_tokens": output_len, "stream": True,
                       "ignore_eos": True, "temperature": 1.0, "seed": seed + i,
                       "stream_options": {"include_usage": True}})
        delays.append(t)
        t += 0.0 if math.isinf(rate) else rng.expovariate(rate)
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits) as client:
        async def send(body: dict, delay: float) -> dict:
            await asyncio.sleep(delay)
            async with gate:
                return await _one(client, url, body, time.perf_counter())

        start = time.perf_counter()
        done = await asyncio.gather(*(send(b, d) for b, d in zip(bodies, delays)))
        return list(done), time.perf_counter() - start


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarize(done: list[dict], seconds: float, output_len: int) -> dict:
    """The row of one load: latencies in milliseconds; RuntimeError if any request failed or made other
    than output_len tokens (the figures would not be about the load asked for)."""
    failed = [d for d in done if not d["ok"]]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(done)} requests failed, e.g. {failed[0]}")
    short = [d["usage"] for d in done if not d["usage"] or d["usage"]["completion_tokens"] != output_len]
    if short:
        raise RuntimeError(f"{len(short)} requests did not make {output_len} tokens (usage {short[0]}); "
                           "the server must honour ignore_eos and stream_options.include_usage")
    ttft = [(d["times"][0] - d["arrival"]) * 1e3 for d in done]
    tpot = [(d["end"] - d["times"][0]) * 1e3 / (output_len - 1) for d in done if output_len > 1]
    itl = [(b - a) * 1e3 for d in done for a, b in zip(d["times"], d["times"][1:])]
    tokens = sum(d["usage"]["completion_tokens"] for d in done)
    return {"requests": len(done), "seconds": seconds, "req_per_s": len(done) / seconds,
            "output_tok_per_s": tokens / seconds,
            "prompt_tokens_mean": statistics.fmean(d["usage"]["prompt_tokens"] for d in done),
            "ttft_ms_median": statistics.median(ttft), "ttft_ms_p99": _pct(ttft, 99),
            "tpot_ms_median": statistics.median(tpot) if tpot else None, "tpot_ms_p99": _pct(tpot, 99),
            "itl_ms_median": statistics.median(itl) if itl else None, "itl_ms_p99": _pct(itl, 99)}


def spawn_toy(device: torch.device, max_num_seqs: int) -> tuple[str, Any]:
    """rast's server on the toy triple in a thread of this process: (its URL, a stop function)."""
    import socket

    import uvicorn

    rast = common.import_engine()
    from rast_engine.server.app import OpenAIServer

    toy = common.ROOT / "engine" / "assets" / "toy"
    engine = rast.LLMEngine(rast.EngineConfig(str(toy / "large"), str(toy / "small_rl"), str(toy / "small"), lam=0.5,
                                              device=str(device), dtype="float32", max_num_seqs=max_num_seqs))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(OpenAIServer(engine, model_name="rast").app(), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the toy server did not start")
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def _more(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="a running OpenAI-compatible server (else --toy)")
    p.add_argument("--model", default="rast", help="the model name the --url server serves")
    p.add_argument("--toy", action="store_true",
                   help="run rast's server on the toy triple in this process (the default without --url)")
    p.add_argument("--device-name", default=None, help="the server's device, for the result file (--url)")
    p.add_argument("--requests", type=int, default=None, help="requests a load (default 8 x concurrency)")
    p.add_argument("--rate", type=float, nargs="+", default=[math.inf], help="requests per second (inf: all at once)")
    p.add_argument("--concurrency", type=int, nargs="+", default=None, help="most requests in flight")
    p.add_argument("--input-len", type=int, default=None, help="prompt words (default 256, toy 16, quick 8)")
    p.add_argument("--output-len", type=int, default=None, help="tokens a request (default 256, toy 64, quick 8)")
    p.add_argument("--seed", type=int, default=0)


def main() -> None:
    args = common.quick_args(__doc__, "smoke run: concurrency 1 and 4, 8-word prompts, 8 tokens", _more)
    if args.url is not None and args.toy:
        raise SystemExit("give --url of a running server, or --toy (the default), not both")
    args.toy = args.url is None
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    concurrency = args.concurrency or ([1, 4] if args.quick else [1, 8, 32, 128])
    # the toy's context holds 128 tokens: its defaults fit it (256 + 256 would make every request a 400)
    input_len = args.input_len or (8 if args.quick else 16 if args.toy else 256)
    output_len = args.output_len or (8 if args.quick else 64 if args.toy else 256)
    rows, target = _run(args, device, concurrency, input_len, output_len)
    server = args.device_name or "remote" if args.url else common.device_name(device)
    print(f"serving | {target} | server {server} | commit {common.git_sha()}")
    print(common.table(rows, ["concurrency", "rate", "requests", "output_tok_per_s", "ttft_ms_median", "ttft_ms_p99",
                              "tpot_ms_median", "tpot_ms_p99", "itl_ms_median"]))
    if common.keeps_results(args.out, device, args.quick):
        extra = {"target": target, "client": common.device_name(torch.device("cpu"))}
        path = common.write_results("serving", server, rows, extra, args.out)
        print(f"wrote {path}")


def _run(args: argparse.Namespace, device: torch.device, concurrency: list[int], input_len: int,
         output_len: int) -> tuple[list[dict], str]:
    """The rows of every (concurrency, rate) load, and what served them."""
    if args.url:
        url, stop, target, model = args.url.rstrip("/"), (lambda: None), args.url, args.model
    else:
        (url, stop), target, model = spawn_toy(device, max(concurrency)), "engine/assets/toy", "rast"
    rows = []
    try:
        for c in concurrency:
            for rate in args.rate:
                n = args.requests or 8 * c
                done, seconds = asyncio.run(_load(url, model, n, rate, c, input_len, output_len, args.seed))
                rows.append({"concurrency": c, "rate": rate if math.isfinite(rate) else None, "input_len": input_len,
                             "output_len": output_len, **summarize(done, seconds, output_len)})
    finally:
        stop()
    return rows, target


if __name__ == "__main__":
    main()
