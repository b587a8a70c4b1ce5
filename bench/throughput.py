"""Offline throughput: a batch of requests through the engine, as vLLM's `bench throughput` measures it
(requests/s, output and total tokens/s over the wall time, prefills and scheduling included), next to the
floor those steps could reach.

    python bench/throughput.py                                   # CUDA: 7B+Δ1.5B, base and rast, 1000 requests
    python bench/throughput.py --pairings 14b+7b --num-prompts 500 --input-len 512 --output-len 1024
    python bench/throughput.py --tiny --quick                    # CPU smoke run (automatic without CUDA)

Each request is a random token-id prompt of --input-len tokens with ``ignore_eos`` and ``max_tokens``
--output-len; with --range-ratio r both lengths are drawn uniformly from [len * (1 - r), len * (1 + r)]
(seeded), so requests finish at different steps and the engine refills its slots (continuous batching).
All requests are added at once, as `vllm bench throughput` hands them to LLM.generate. Weights are random
with the shapes of bench/configs (bench/decode_configs.py), sampled at T = 1, top-p 0.95.

The floor: every engine step reads every weight of the models it runs once (a mixture of experts: the
experts its answered sequences route to, at uniform routing), and every running sequence's
KV cache up to its context (bench/roofline.py); the sum of those bytes over the run's steps, over the
measured copy bandwidth, is the time no schedule of these steps can beat. Prefill compute is not in it,
so at long prompts the floor is loose. ``floor_frac`` = wall time / floor.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.decode_configs import PAIRINGS, TINY_PAIRINGS, materialize  # noqa: E402
from bench.roofline import kv_bytes_read, param_counts  # noqa: E402

MODES = {"base": False, "rast": True}  # the large model alone, or with the small pair (every fast path on)
LAM = 1.0


def requests(n: int, input_len: int, output_len: int, ratio: float, vocab: int, seed: int
             ) -> list[tuple[list[int], int]]:
    """(prompt ids, tokens to generate) per request, seeded."""
    rng = random.Random(seed)

    def draw(length: int) -> int:
        return max(1, rng.randint(int(length * (1 - ratio)), int(length * (1 + ratio))))
    return [([rng.randrange(vocab) for _ in range(draw(input_len))], draw(output_len)) for _ in range(n)]


def run(engine: Any, sp_cls: Any, reqs: list[tuple[list[int], int]], cfgs: list[dict], elt: int,
        device: torch.device) -> dict:
    """Every request added at once, the engine stepped to the end; the bytes each step had to read counted
    from the sequences it ran (each decode step: all weights, each running sequence's KV to its context)."""
    for i, (prompt, gen) in enumerate(reqs):
        engine.add_request(f"r{i}", prompt, sp_cls(temperature=1.0, top_p=0.95, ignore_eos=True, max_tokens=gen))
    made = {f"r{i}": 0 for i in range(len(reqs))}
    stepped, contexts = [], []  # per step its answered sequences, per new token its context: counted after
    common.sync(device)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step()
        stepped.append(len(outs))
        for out in outs:
            produced = sum(len(c.token_ids) for c in out.outputs)  # cumulative outputs
            if produced > made[out.request_id]:
                contexts.append(len(reqs[int(out.request_id[1:])][0]) + produced)
                made[out.request_id] = produced
    common.sync(device)
    wall = time.perf_counter() - start
    # the floor's bytes, outside the timed loop (each count parses the configs): a mixture of experts reads
    # more experts for more tokens, so a step's weights depend on how many sequences it answered
    weights = {n: sum(param_counts(c, max(1, n))[1] * elt for c in cfgs) for n in set(stepped)}
    kv = {n: sum(kv_bytes_read(c, elt, n) for c in cfgs) for n in set(contexts)}
    floor_bytes = float(sum(weights[n] for n in stepped) + sum(kv[n] for n in contexts))
    steps = len(stepped)
    out_tokens = sum(made.values())
    if out_tokens != sum(gen for _, gen in reqs):
        raise RuntimeError(f"the engine made {out_tokens} tokens where {sum(g for _, g in reqs)} were asked for")
    in_tokens = sum(len(p) for p, _ in reqs)
    return dict(wall_s=wall, steps=steps, requests_per_s=len(reqs) / wall, output_tokens_per_s=out_tokens / wall,
                total_tokens_per_s=(in_tokens + out_tokens) / wall, input_tokens=in_tokens, output_tokens=out_tokens,
                floor_bytes=floor_bytes)


def parse(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, torch.device]:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random configs (automatic without CUDA)")
    ap.add_argument("--quick", action="store_true", help="fewer requests (200; tiny 8)")
    ap.add_argument("--device", default="auto", help="cuda | cpu | auto")
    ap.add_argument("--pairings", nargs="+", choices=[*PAIRINGS, *TINY_PAIRINGS],
                    help="default 7b+1.5b (tiny: tiny; tiny-moe: a tiny mixture of experts as the large model)")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--num-prompts", type=int, help="requests (default 1000; tiny 16; quick 200 / 8)")
    ap.add_argument("--input-len", type=int, help="prompt tokens (default 512; tiny 16)")
    ap.add_argument("--output-len", type=int, help="generated tokens (default 512; tiny 8)")
    ap.add_argument("--range-ratio", type=float, default=0.0, help="lengths drawn in len x [1 - r, 1 + r] (default 0)")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="the engine's running batch (default 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(common.RESULTS), help="directory of the JSON")
    ap.add_argument("--commit", help="commit to record (default: git rev-parse in this checkout)")
    a = ap.parse_args(argv)
    device = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    a.tiny = a.tiny or device.type != "cuda"
    a.pairings = a.pairings or (["tiny"] if a.tiny else ["7b+1.5b"])
    if a.tiny != all(p in TINY_PAIRINGS for p in a.pairings):
        ap.error(f"--tiny runs the pairings {sorted(TINY_PAIRINGS)} only, and they need --tiny")
    if a.num_prompts is None:
        a.num_prompts = (8 if a.quick else 16) if a.tiny else (200 if a.quick else 1000)
    if a.input_len is None:
        a.input_len = 16 if a.tiny else 512
    if a.output_len is None:
        a.output_len = 8 if a.tiny else 512
    if min(a.num_prompts, a.input_len, a.output_len, a.max_num_seqs) < 1 or not 0 <= a.range_ratio < 1:
        ap.error("--num-prompts, --input-len, --output-len, --max-num-seqs must be >= 1 and 0 <= --range-ratio < 1")
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny matmuls: threads only add sync overhead, and CI boxes are shared
    return a, device


def main(argv: Optional[list[str]] = None) -> int:
    a, device = parse(argv)
    rast = common.import_engine()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elt = torch.empty((), dtype=dtype).element_size()
    bandwidth, commit = common.copy_bandwidth(device), a.commit or common.git_sha()
    longest = int(a.input_len * (1 + a.range_ratio)) + int(a.output_len * (1 + a.range_ratio))
    print(f"throughput bench on {common.device_name(device)} at {commit}: copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"{a.num_prompts} requests of {a.input_len} + {a.output_len} tokens (range ratio {a.range_ratio})", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="rast-bench-") as tmp:
        for pairing in a.pairings:
            dirs, cfgs = materialize(pairing, Path(tmp))
            vocab = min(c["vocab_size"] for c in cfgs)
            reqs = requests(a.num_prompts, a.input_len, a.output_len, a.range_ratio, vocab, a.seed)
            for mode, pair in MODES.items():
                if mode not in a.modes:
                    continue
                extra = dict(small_rl=str(dirs[1]), small_base=str(dirs[2]), lam=LAM) if pair else {}
                engine = rast.LLMEngine(rast.EngineConfig(
                    model=str(dirs[0]), **extra, load_format="dummy", dtype=str(dtype).replace("torch.", ""),
                    max_num_seqs=a.max_num_seqs, max_model_len=longest, device=str(device)))
                res = run(engine, rast.SamplingParams, reqs, cfgs if pair else cfgs[:1], elt, device)
                floor_s = res.pop("floor_bytes") / bandwidth
                rows.append(dict(mode=mode, pairing=pairing, num_prompts=a.num_prompts, input_len=a.input_len,
                                 output_len=a.output_len, range_ratio=a.range_ratio, **res, floor_s=floor_s,
                                 floor_frac=res["wall_s"] / floor_s))
                print(f"  {pairing:>8} {mode:>5} {res['requests_per_s']:8.2f} req/s {res['output_tokens_per_s']:10.1f} "
                      f"out tok/s  wall {res['wall_s']:.2f} s (floor {floor_s:.2f} s, {res['steps']} steps)", flush=True)
                del engine
                common.release(device)  # before the next engine's weights and KV cache
    extra_fields = dict(copy_bandwidth_GBps=bandwidth / 1e9, dtype=str(dtype), max_num_seqs=a.max_num_seqs, seed=a.seed)
    path = common.write_results("throughput", device, rows, extra_fields, Path(a.out), commit=commit)
    print(common.table(rows, ["pairing", "mode", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s",
                              "wall_s", "floor_s", "floor_frac", "steps"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
