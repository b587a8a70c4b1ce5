"""bench/sampler_fastpath.py end to end (interpreted on the CPU): LM-like rows under an H100's launch
plan, where B = 1 spreads each row over many small chunks of few candidates, take the fast path. Before
candidate eviction every such row fell back (the first tokens of a chunk filled its list)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_writes_fast_fractions(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "sampler_fastpath.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("sampler-fastpath-*.json")
    result = json.loads(path.read_text())
    assert result["emulated"] and result["sms"] == 132 and result["commit"]
    rows = result["rows"]
    assert {(r["plan_batch"], r["top_k"]) for r in rows} == {(1, 0), (1, 50), (32, 0), (32, 50)}
    one = [r for r in rows if r["plan_batch"] == 1]
    assert all(r["splits"] == 8 and r["chunk"] == 1024 for r in one)  # 8192 tokens in 1024-token chunks
    assert all(r["fast_fraction"] == 1.0 for r in rows), rows
