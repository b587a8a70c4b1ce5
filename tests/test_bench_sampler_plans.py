"""bench/sampler_plans.py end to end (interpreted on the CPU), and the launch-plan overrides it sweeps:
another CAP draws the same tokens (each plan is exact), and a num_warps that is no power of two is
refused before any launch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench_runs import load_bench, run_bench
from rast_kernels import sampler_triton
from rast_kernels.batch import normalize


def test_quick_run_writes_one_row_per_plan(tmp_path: Path) -> None:
    result, _, out = run_bench("sampler_plans.py", tmp_path, "--quick", pattern="sampler-plans-*.json",
                               env={"TRITON_INTERPRET": "1"})
    assert result["emulated"] and result["commit"]
    rows = result["rows"]
    assert [(r["rows"], r["batch"], r["cap"]) for r in rows] == \
        [(kind, b, cap) for b in (1, 4)
         for kind, cap in (("lm", 512), ("lm", 1024), ("lm-search", 1024), ("flat", 1024), ("flat-search", 1024))]
    assert [r["default"] for r in rows] == [False, True, True, True, True] * 2
    # (at V = 4096 a chunk's CAP holds every token, so even flat rows draw from candidates here)
    assert all(r["fast_fraction"] == 1.0 for r in rows if r["rows"] in ("lm", "lm-search")), rows
    # LM-like rows at top_p 0.95: the draws settle every row unless the sweep asks for the search
    assert [r["proven_fraction"] for r in rows if r["rows"].startswith("lm")] == [1.0, 1.0, 0.0] * 2
    assert "B=4: chunk" in out and "flat rows: verified draw" in out and "threshold search" in out
    assert "searching the threshold first" in out


def test_plans_draw_the_same_tokens_and_bad_warps_are_refused() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 700, generator=g) * 3
    pair = (torch.randn(3, 700, generator=g), torch.randn(3, 700, generator=g))
    batch = normalize(logits, [pair], weights=0.5, temperature=1.0, top_k=0, top_p=0.9, min_p=0.0,
                      seed=torch.arange(3))
    ids = [sampler_triton.sample(batch, cap=cap, warps=(4, 16)) for cap in (16, 64, 256)]
    assert all(torch.equal(ids[0], other) for other in ids[1:])
    with pytest.raises(ValueError, match="num_warps must be a power of two"):
        sampler_triton.sample(batch, warps=(None, 6))


def test_long_chunk_rows_undo_the_lane_cut_only_where_it_applies() -> None:
    """The sweep's last plan times the chunk that 4 programs per SM give, before launch_plan cuts it to
    LANE_TOKENS blocks: on an H100 at V = 152064 that differs at B = 256 (3 chunks of 1024 candidates
    against 7 of 512) and not at B <= 32, where the sweep skips it."""
    plans = load_bench("sampler_plans.py")
    assert plans.plans(512, quick=False)[-1] == (512, 8, 8, sampler_triton.WIDE, True)
    assert not any(p[-1] for p in plans.plans(512, quick=True))
    for batch, uncut, cut in ((256, (51200, 3, 1024), (22528, 7, 512)), (32, (9216, 17, 128), (9216, 17, 128))):
        assert sampler_triton.launch_plan(batch, 152064, 132, block=1024, lane_tokens=None)[1:] == uncut
        assert sampler_triton.launch_plan(batch, 152064, 132, block=1024)[1:] == cut
