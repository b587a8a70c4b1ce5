"""Cost of a step's logit adjustments (engine/logit_adjust.py: logit_bias, min_tokens, penalties), the
work an adjusted batch adds before the fused sampler.

    python bench/logit_adjust.py            # table, and bench/results/logit-adjust-<device>-<sha>.json
    python bench/logit_adjust.py --quick    # smoke run, small shapes (on the CPU)

Each row decodes ``rows`` adjusted sequences (prompt and output lengths as given, every sequence one new
token a call, as in decoding) and times with_adjustments on bf16 logits of one small pair:
`host_us`, the Python time of the call (on CUDA the device work is only enqueued then), and `us`, the
median wall time with the device work done (CUDA events). The floor is the bytes the dense part must
move over the measured copy bandwidth: the three models' logits rows read once (bf16), the output counts
read once (penalties, float32), the [rows, V] bias written once (float32).
Kinds: `bias` (300 logit_bias entries and min_tokens masking 2 ids), `penalties` (repetition, frequency
and presence), `both`.
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (copy_bandwidth, device_name, import_engine, quick_args, sync, table, time_us,  # noqa: E402
                          write_results)

KINDS = ("bias", "penalties", "both")


def params_of(kind: str, vocab: int) -> dict:
    rng = random.Random(0)
    kw: dict = {}
    if kind in ("bias", "both"):
        kw.update(logit_bias={t: rng.choice([-100.0, 2.0]) for t in rng.sample(range(vocab), min(300, vocab))},
                  min_tokens=10**6, max_tokens=10**6, stop_token_ids=[0, 1])
    if kind in ("penalties", "both"):
        kw.update(repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1)
    return kw


def make_draws(kind: str, rows: int, vocab: int, prompt: int, output: int, device: torch.device) -> list:
    engine = import_engine()
    from rast_engine.draws import Draw
    from rast_engine.logit_adjust import OutputCounts, adjustment
    from rast_engine.sequence import Sequence, SequenceGroup

    params = engine.SamplingParams(**params_of(kind, vocab))
    rng = random.Random(rows)
    draws = []
    for r in range(rows):
        ids = [rng.randrange(vocab) for _ in range(prompt + output)]
        group = SequenceGroup(request_id=f"r{r}", prompt=None, prompt_token_ids=ids[:prompt], params=params,
                              request_seed=r, arrival=r, weights=[0.7])
        seq = Sequence(group=group, index=0, token_ids=ids, seed=r)
        adjust = adjustment(seq, False, [2])
        assert adjust is not None and (seq.output_counts is None) == (not params.penalized)
        if isinstance(seq.output_counts, OutputCounts):
            seq.output_counts.tensor(seq.token_ids, prompt, vocab, lambda t: t.to(device))
        draws.append(Draw(r, params, [0.7], r, output, adjust))
    return draws


def bytes_moved(kind: str, rows: int, vocab: int) -> int:
    counts = 4 if kind in ("penalties", "both") else 0
    return rows * vocab * (3 * 2 + counts + 4)


def measure(kind: str, rows: int, vocab: int, prompt: int, output: int, device: torch.device) -> dict:
    from rast_engine.logit_adjust import with_adjustments

    draws = make_draws(kind, rows, vocab, prompt, output, device)
    g = torch.Generator().manual_seed(rows)
    logits = [(torch.randn(rows, vocab, generator=g) * 3).to(torch.bfloat16).to(device) for _ in range(3)]
    to_device = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    rng = random.Random(1)

    def step() -> None:
        for d in draws:  # one new token each, as a decode step adds
            if d.adjust.seq is not None:
                d.adjust.seq.token_ids.append(rng.randrange(vocab))
        with_adjustments(logits, draws, to_device, vocab)

    host = []
    for _ in range(13):
        sync(device)
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e6)
    sync(device)
    us = time_us(step, device, warmup=2, iters=10)
    return dict(kind=kind, rows=rows, vocab=vocab, prompt=prompt, output=output,
                host_us=sorted(host[3:])[5], us=us, bytes=bytes_moved(kind, rows, vocab))


def main() -> None:
    args = quick_args(__doc__, "CPU smoke run: small shapes")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    # Qwen2.5's vocabulary, a 4000-token prompt and 1000 tokens of output so far
    grid = [(1, 1000, 64, 32), (4, 1000, 64, 32)] if args.quick else [(r, 152064, 4000, 1000) for r in (1, 8, 32)]
    bw = copy_bandwidth(device)
    rows = []
    for n, vocab, prompt, output in grid:
        for kind in KINDS:
            row = measure(kind, n, vocab, prompt, output, device)
            row["floor_us"] = row["bytes"] / bw * 1e6
            rows.append(row)
    print(f"device: {device_name(device)}; copy bandwidth {bw / 1e9:.0f} GB/s")
    print(table(rows, ["kind", "rows", "vocab", "prompt", "output", "host_us", "us", "floor_us"]))
    path = write_results("logit-adjust", device, rows, {"copy_gbs": bw / 1e9}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
