"""Host work per decode step: the engine's Python between one step's end and the next step's launch,
during which the GPU idles (with async outputs, detokenising and building outputs overlap the next step
instead and are reported apart).

    python bench/host_path.py            # CUDA: table, and bench/results/host-path-<device>-<sha>.json
    python bench/host_path.py --quick    # CPU smoke run

The engine runs the tiny RAST triple of bench/decode.py (random weights, no tokenizer: outputs are token
ids) with async outputs on, B requests decoding together. Each engine.step() is split into
`commit` (take the finished step's tokens), `launch` (schedule, fill the step's inputs, replay the
decode graph: on the critical path with commit) and `outputs` (build the step's outputs while the next
step runs). On a CPU the decode step itself is stubbed out (its compute is not host overhead there); on a
GPU the replayed graph runs for real and asynchronously, so launch is its enqueueing only.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402
from bench.decode import materialize  # noqa: E402

PARTS = ("commit", "launch", "outputs")


def build(device: torch.device, max_batch: int, max_len: int) -> Any:
    rast = common.import_engine()
    dirs, _ = materialize("tiny", Path(tempfile.mkdtemp()))
    return rast.LLMEngine(rast.EngineConfig(
        model=str(dirs[0]), small_rl=str(dirs[1]), small_base=str(dirs[2]), load_format="dummy",
        device=str(device), max_num_seqs=max_batch, max_model_len=max_len,
        kv_cache_blocks=max_batch * -(-max_len // 16) + 1, async_output=True))


def stub_decode_step(engine: Any) -> None:
    """The decode step's outputs computed once per row count and returned thereafter."""
    runner, real, cache = engine.runner, engine.runner._decode_step, {}

    def cached(rows: int) -> Any:
        if rows not in cache:
            cache[rows] = real(rows)
        return cache[rows]
    runner._decode_step = cached


def timed(spent: dict[str, float], name: str, fn: Callable) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start
    return wrapper


def measure(engine: Any, sp_cls: Any, batch: int, steps: int) -> dict:
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", [5 + i % 400, 6, 7, 8],
                           sp_cls(temperature=1.0, top_p=0.95, max_tokens=steps + 3, ignore_eos=True, seed=i))
    for _ in range(3):  # prefill, then a step in flight: the loop below is steady-state decode
        engine.step()
    spent = dict.fromkeys(PARTS, 0.0)
    originals = {name: getattr(engine, f"_{name}") for name in PARTS}
    for name, fn in originals.items():
        setattr(engine, f"_{name}", timed(spent, name, fn))
    n = 0
    while engine.has_unfinished_requests():
        engine.step()
        n += 1
    for name, fn in originals.items():
        setattr(engine, f"_{name}", fn)
    row = {f"{name}_us": spent[name] / n * 1e6 for name in PARTS}
    row.update(batch=batch, steps=n, critical_us=row["commit_us"] + row["launch_us"])
    return row


def main() -> None:
    args = common.quick_args(__doc__, "CPU smoke run: batches 1 and 4, 10 steps")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    batches, steps = ([1, 4], 10) if args.quick else ([1, 8, 32, 128], 100)
    torch.set_num_threads(1)
    engine = build(device, max(batches), 16 + steps)
    if device.type == "cpu":
        stub_decode_step(engine)
    sp_cls = common.import_engine().SamplingParams
    rows = [measure(engine, sp_cls, b, steps) for b in batches]
    print(f"engine host work per decode step | {common.device_name(device)} | commit {common.git_sha()}")
    print(common.table(rows, ["batch", "steps", "commit_us", "launch_us", "critical_us", "outputs_us"]))
    if args.out is not None or device.type == "cuda":
        path = common.write_results("host-path", device, rows, dict(decode_stubbed=device.type == "cpu"), args.out)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
