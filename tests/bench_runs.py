"""Running a bench/ script as CI does (a subprocess on the CPU, its one result file read back), or
importing it as a module to test its parts."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_bench(script: str) -> ModuleType:
    """bench/<script> as a module (it puts the repository root on sys.path for its sibling modules)."""
    spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}", ROOT / "bench" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(script: str, out: Path, *args: str, pattern: str, env: dict | None = None,
              timeout: int = 300) -> tuple[dict, Path, str]:
    """(the JSON, its path, stdout) of ``bench/<script> *args --out <out>``, which must exit 0 and
    leave exactly one file matching ``pattern`` in ``out``."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(out.glob(pattern))
    assert len(files) == 1, f"expected one {pattern} in {out}, found {sorted(p.name for p in out.iterdir())}"
    return json.loads(files[0].read_text()), files[0], done.stdout
