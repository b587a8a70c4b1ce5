"""bench/gpu_session.sh is the only way gpu-marked tests ever run (CI has no GPU), and it names their
files explicitly: a file with gpu tests that it does not name would never be run on a GPU."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_agenda_runs_every_file_with_gpu_tests() -> None:
    marked = {p.name for p in (ROOT / "tests").glob("test_*.py")
              if re.search(r"pytest\.mark\.gpu\b", p.read_text())}
    named = set(re.findall(r"tests/(test_\w+\.py)", (ROOT / "bench" / "gpu_session.sh").read_text()))
    assert marked, "no gpu-marked tests found: the pattern is stale"
    assert marked <= named, f"gpu tests the GPU agenda never runs: {sorted(marked - named)}"
