"""bench/host_path.py end to end on the CPU: per-step host work split into its parts, for each batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_splits_each_step(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "host_path.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("host-path-*.json")
    result = json.loads(path.read_text())
    assert result["decode_stubbed"] and result["commit"] and result["device"]
    assert [r["batch"] for r in result["rows"]] == [1, 4]
    for r in result["rows"]:
        assert r["steps"] == 10  # max_tokens = steps + 3, three steps before timing (one is the prefill)
        assert min(r["commit_us"], r["launch_us"], r["outputs_us"]) > 0
        assert r["critical_us"] == r["commit_us"] + r["launch_us"]
