"""Host work per decode step, and the part of it during which the GPU has no step queued and idles.

    python bench/host_path.py            # CUDA: table, and bench/results/host-path-<device>-<sha>.json
    python bench/host_path.py --quick    # CPU smoke run

The engine runs the tiny RAST triple of bench/decode.py (random weights, no tokenizer: outputs are token
ids) with async outputs on, B requests decoding together, with async scheduling off and on. Each
engine.step() is split into `launch_ahead` (schedule and launch the next step before this one's ids are
read), `commit` (take the finished step's tokens), `launch` (schedule, fill the step's inputs, replay
the decode graph after the commit) and `outputs` (build the step's outputs while the next step runs).
`critical_us` is the part with no step queued on the device: every `launch`, and a `commit` made with
nothing in flight. Without async scheduling that is commit + launch at every step; with it, the next
step is queued first, so only steps that fall back (a preemption, a prompt prefilled in chunks, a first
draw forking n > 1) pay it, and the GPU idles only when a whole step's host work (`host_us`) exceeds its device time.
On a CPU the decode step itself is stubbed out (its compute is not host overhead there); on a GPU the
replayed graph runs for real and asynchronously, so a launch is its enqueueing only.
With async scheduling the requests are timed with each output kind (SamplingParams.output_kind): a
cumulative output copies every token so far, so its `outputs` part grows with the output length
(``--steps``); "delta" (what the server streams) and "final_only" (LLM.generate, rast eval) do not.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402
from bench.decode_configs import materialize  # noqa: E402

PARTS = ("launch_ahead", "commit", "launch", "outputs")
# (async scheduling, output kind): the synchronous baseline, then async scheduling with each kind
MODES = ((False, "cumulative"), (True, "cumulative"), (True, "delta"), (True, "final_only"))


def build(device: torch.device, max_batch: int, max_len: int, ahead: bool) -> Any:
    rast = common.import_engine()
    dirs, _ = materialize("tiny", Path(tempfile.mkdtemp()))
    return rast.LLMEngine(rast.EngineConfig(
        model=str(dirs[0]), small_rl=str(dirs[1]), small_base=str(dirs[2]), load_format="dummy",
        device=str(device), max_num_seqs=max_batch, max_model_len=max_len,
        kv_cache_blocks=max_batch * -(-max_len // 16) + 1, async_output=True, async_scheduling=ahead))


def stub_decode_step(engine: Any) -> None:
    """The decode step's outputs computed once per row count and returned thereafter."""
    runner, real, cache = engine.runner, engine.runner._decode_step, {}

    def cached(rows: int) -> Any:
        if rows not in cache:
            cache[rows] = real(rows)
        return cache[rows]
    runner._decode_step = cached


def timed(spent: dict[str, float], name: str, fn: Callable, idle: Callable[[], bool]) -> Callable:
    """``fn`` timed into spent[name], and into spent["critical"] when ``idle()`` held as it started."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start, critical = time.perf_counter(), idle()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            spent[name] += elapsed
            if critical:
                spent["critical"] += elapsed
                spent[f"critical_{name}s"] += 1
    return wrapper


def measure(engine: Any, sp_cls: Any, batch: int, steps: int, output_kind: str, requests: Optional[int] = None) -> dict:
    """``requests`` (default ``batch``) requests through an engine of max_num_seqs = batch or more; with
    more requests than that, their output lengths differ by up to 6 tokens, as in an evaluation run,
    so they do not all finish (and free their slots) at the same step."""
    requests = requests or batch
    for i in range(requests):
        length = steps + 3 + (i % 7 if requests > batch else 0)
        engine.add_request(f"{output_kind}-b{batch}-{i}", [5 + i % 400, 6, 7, 8],
                           sp_cls(temperature=1.0, top_p=0.95, max_tokens=length, ignore_eos=True, seed=i,
                                  output_kind=output_kind))
    for _ in range(3):  # prefill, then a step in flight: the loop below is steady-state decode
        engine.step()
    spent = dict.fromkeys(PARTS + ("critical", "critical_commits", "critical_launchs"), 0.0)
    originals = {name: getattr(engine, f"_{name}") for name in PARTS}
    nothing_queued = {"launch": lambda: True, "commit": lambda: engine._in_flight is None}
    for name, fn in originals.items():
        setattr(engine, f"_{name}", timed(spent, name, fn, nothing_queued.get(name, lambda: False)))
    n = 0
    while engine.has_unfinished_requests():
        engine.step()
        n += 1
    for name, fn in originals.items():
        setattr(engine, f"_{name}", fn)
    row = {f"{name}_us": spent[name] / n * 1e6 for name in PARTS + ("critical",)}
    row.update(async_scheduling=engine.async_scheduling, output_kind=output_kind, batch=batch, requests=requests,
               steps=n,
               host_us=sum(row[f"{name}_us"] for name in PARTS),
               idle_steps=int(spent["critical_commits"]))  # steps whose commit found no step queued
    return row


def main() -> None:
    args = common.quick_args(__doc__, "CPU smoke run: batches 1 and 4, 10 steps", lambda p: p.add_argument(
        "--steps", type=int, default=None, help="decode steps timed per request (default 100; 10 with --quick)"))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    batches, steps = ([1, 4], 10) if args.quick else ([1, 8, 32, 128], 100)
    steps = args.steps or steps
    torch.set_num_threads(1)
    sp_cls = common.import_engine().SamplingParams
    rows = []
    for ahead in (False, True):
        engine = build(device, max(batches), 16 + steps, ahead)
        if device.type == "cpu":
            stub_decode_step(engine)
        rows += [measure(engine, sp_cls, b, steps, kind) for a, kind in MODES if a == ahead for b in batches]
    # an evaluation run: four times more requests than slots, so some wait through most steps; with async
    # scheduling the prefills that admit them are launched ahead too (on a CPU they are not stubbed out)
    slots = batches[-1] // 2
    for ahead in (False, True):
        engine = build(device, slots, 16 + steps, ahead)
        if device.type == "cpu":
            stub_decode_step(engine)
        rows.append(measure(engine, sp_cls, slots, steps, "final_only", requests=4 * slots))
    print(f"engine host work per decode step | {common.device_name(device)} | commit {common.git_sha()}")
    print(common.table(rows, ["async_scheduling", "output_kind", "batch", "requests", "steps", "launch_ahead_us",
                              "commit_us", "launch_us", "outputs_us", "host_us", "critical_us", "idle_steps"]))
    if args.out is not None or device.type == "cuda":
        path = common.write_results("host-path", device, rows, dict(decode_stubbed=device.type == "cpu"), args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
