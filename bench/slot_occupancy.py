"""Slots left idle while requests wait: requests of n samples each streamed through the engine's slots.

    python bench/slot_occupancy.py            # table, and bench/results/slot-occupancy-<device>-<sha>.json
    python bench/slot_occupancy.py --quick    # CPU smoke run

A counting benchmark, not a timing one: what it measures is the engine's scheduling (the decode batch
sizes), the same on any device. The tiny RAST triple of bench/decode.py (random weights) decodes the
same number of samples at each n, with seeded sampling and stop tokens for output lengths that differ
(geometric-like); a row's tokens depend on its n and seeds only, never on the scheduling. Per row: the
steps to finish, the steps scheduled while some sequence waited for a slot (a queued request, or a
sample that found no slot at its request's first draw, see engine/scheduler.py), and the free slots of
those steps on average. A decode step costs about as much with a full batch as with a partial one while
the weights' reads dominate, so an idle slot while others wait is throughput lost, and fewer steps for
the same tokens is the gain.
"""
from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402
from bench.decode_configs import materialize  # noqa: E402

STOP_IDS = list(range(10, 14))  # seeded draws of these end a sample: lengths differ, the total is fixed


def build(device: torch.device, slots: int, max_len: int) -> Any:
    rast = common.import_engine()
    dirs, _ = materialize("tiny", Path(tempfile.mkdtemp()))
    return rast.LLMEngine(rast.EngineConfig(
        model=str(dirs[0]), small_rl=str(dirs[1]), small_base=str(dirs[2]), load_format="dummy",
        device=str(device), max_num_seqs=slots, max_model_len=max_len, seed=3,
        kv_cache_blocks=4 * slots * -(-max_len // 16)))


def measure(engine: Any, sp_cls: Any, n: int, samples: int, max_tokens: int) -> dict:
    sched, seen = engine.scheduler, []
    schedule = sched.schedule

    def watched() -> Any:
        out = schedule()
        seen.append(sched.max_num_seqs - len(sched.running) if sched.waiting else None)
        return out

    sched.schedule = watched
    rng = random.Random(0)
    for i in range(samples // n):
        prompt = [rng.randrange(4, 90) for _ in range(rng.randrange(8, 30))]
        engine.add_request(f"r{i}", prompt, sp_cls(n=n, temperature=1.0, max_tokens=max_tokens, seed=i,
                                                   stop_token_ids=STOP_IDS))
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    sched.schedule = schedule
    idle = [s for s in seen if s is not None]
    return dict(n=n, requests=samples // n, slots=sched.max_num_seqs, steps=steps, queued_steps=len(idle),
                idle_slots_avg=sum(idle) / max(len(idle), 1),
                tokens=engine.stats().generation_tokens_total)


def main() -> None:
    args = common.quick_args(__doc__, "CPU smoke run: 8 slots, 32 samples")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    slots, samples, ns = (8, 32, [1, 4, 8]) if args.quick else (64, 768, [1, 4, 16, 64])
    max_tokens = 120
    torch.set_num_threads(1)  # a count, not a timing: one thread keeps it quick beside other processes
    sp_cls = common.import_engine().SamplingParams
    rows = [measure(build(device, slots, 32 + max_tokens), sp_cls, n, samples, max_tokens) for n in ns]
    print(f"slots idle while requests wait | {common.device_name(device)} | commit {common.git_sha()}")
    print(common.table(rows, ["n", "requests", "slots", "steps", "queued_steps", "idle_slots_avg", "tokens"]))
    if common.keeps_results(args.out, device, args.quick):
        path = common.write_results("slot-occupancy", device, rows, None, args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
