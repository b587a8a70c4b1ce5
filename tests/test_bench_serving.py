"""bench/serving.py end to end on the CPU (rast's server on the toy triple in the process), and its
summary against the requests it made: every request's tokens are counted by the server's usage, and the
latencies are ordered as their definitions make them."""
from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import torch
from bench_runs import load_bench, run_bench


def test_quick_run_writes_its_rows(tmp_path: Path) -> None:
    result, path, out = run_bench("serving.py", tmp_path, "--toy", "--quick", pattern="serving-*.json")
    assert result["target"] == "engine/assets/toy" and "serving | engine/assets/toy" in out
    rows = result["rows"]
    assert [(r["concurrency"], r["requests"], r["output_len"]) for r in rows] == [(1, 8, 8), (4, 32, 8)]
    for r in rows:
        assert math.isclose(r["output_tok_per_s"], r["requests"] * r["output_len"] / r["seconds"])
        assert 0 < r["ttft_ms_median"] <= r["ttft_ms_p99"] and 0 < r["tpot_ms_median"] <= r["tpot_ms_p99"]
        assert r["itl_ms_median"] > 0 and r["prompt_tokens_mean"] > 0


def test_a_poisson_load_against_a_url_and_short_requests_refused() -> None:
    serving = load_bench("serving.py")
    url, stop = serving.spawn_toy(torch.device("cpu"), 2)
    try:
        done, seconds = asyncio.run(serving._load(url, "rast", 4, 50.0, 2, 4, 5, seed=1))
        row = serving.summarize(done, seconds, 5)
        assert row["requests"] == 4 and all(d["usage"]["completion_tokens"] == 5 for d in done)
        assert all(d["arrival"] <= d["times"][0] <= d["end"] for d in done)
        with pytest.raises(RuntimeError, match="did not make 6 tokens"):
            serving.summarize(done, seconds, 6)
        bad, seconds = asyncio.run(serving._load(url, "nope", 1, math.inf, 1, 4, 5, seed=1))
        with pytest.raises(RuntimeError, match="1 of 1 requests failed"):
            serving.summarize(bad, seconds, 5)
    finally:
        stop()
