"""`rast eval compare BASE RAST RL`: the paper's Table 1 recovery rates, in Markdown.

Recovery rate = (acc_RAST − acc_base) / (acc_RL − acc_base), acc = avg pass@1 (paper Eq. 5). Each
argument is a metrics.json or a folder searched (recursively) for them; runs pair up by their dataset
name. The Average row holds the mean accuracy of each column and the mean of the defined recovery
rates (a dataset where RL does not beat the base has no defined rate).

RAST − Base pairs the two runs problem by problem (their metrics' correct_by_problem): the mean of the
per-problem accuracy differences, in points, ± its standard error over problems, which is smaller than
either run's own when the runs agree on which problems are hard. n/a where a run predates the counts or
the runs hold other problems."""
from __future__ import annotations

import json
import math
from pathlib import Path

from rast_engine.errors import RastError
from rast_engine.evaluation.metrics import sample_std
from rast_engine.evaluation.runner import METRICS_FILE


def load_runs(spec: str) -> dict[str, dict]:
    """dataset name -> metrics, from one metrics file or every metrics.json under a folder."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.rglob(METRICS_FILE))
        if not files:
            raise RastError(f"no {METRICS_FILE} under {spec!r}")
    elif path.is_file():
        files = [path]
    else:
        raise RastError(f"{spec!r} is neither a metrics file nor a folder")
    runs: dict[str, dict] = {}
    for f in files:
        try:
            m = json.loads(f.read_text(encoding="utf-8"))
            name, acc = m["dataset"], m["avg_pass@1"]
            ok = isinstance(name, str) and isinstance(acc, (int, float)) and not isinstance(acc, bool) \
                and 0 <= acc <= 1
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            ok = False
        if not ok:  # the dataset names a run; avg_pass@1 is an accuracy (NaN fails the range too)
            raise RastError(f"{f} is not a metrics file written by rast eval")
        if name in runs:
            raise RastError(f"two runs of dataset {name!r} under {spec!r}")
        runs[name] = m
    return runs


def recovery_rate(base: float, rast: float, rl: float) -> float | None:
    """None when RL does not beat the base: the gap to recover is empty or negative."""
    gap = rl - base
    return (rast - base) / gap if gap > 0 else None


def paired_difference(base: dict, rast: dict) -> tuple[float, float] | None:
    """(mean, standard error) over problems of rast's per-problem accuracy minus base's; None unless both
    runs count each of the same problems' correct samples."""
    counts = [m.get("correct_by_problem") for m in (base, rast)]
    ns = [m.get("n") for m in (base, rast)]
    if not all(isinstance(c, dict) and c for c in counts) or set(counts[0]) != set(counts[1]) or \
            not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in ns) or \
            not all(isinstance(v, int) and 0 <= v <= n for c, n in zip(counts, ns) for v in c.values()):
        return None
    d = [counts[1][k] / ns[1] - counts[0][k] / ns[0] for k in counts[0]]
    return sum(d) / len(d), sample_std(d) / math.sqrt(len(d))


def _paired(x: tuple[float, float] | None) -> str:
    return "n/a" if x is None else f"{100 * x[0]:+.1f} ± {100 * x[1]:.1f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def compare_table(base_spec: str, rast_spec: str, rl_spec: str) -> str:
    base, rast, rl = load_runs(base_spec), load_runs(rast_spec), load_runs(rl_spec)
    names = [n for n in base if n in rast and n in rl]
    if not names:
        raise RastError("no dataset appears in all three runs (runs pair up by the 'dataset' field)")
    rows = ["| Dataset | Base | RAST | RL | RR. (%) | RAST − Base (pp, ± s.e.) |", "|---|---:|---:|---:|---:|---:|"]
    accs: list[tuple[float, float, float]] = []
    rates: list[float] = []
    for name in sorted(names):
        a, b, c = (float(r[name]["avg_pass@1"]) for r in (base, rast, rl))
        rr = recovery_rate(a, b, c)
        accs.append((a, b, c))
        if rr is not None:
            rates.append(rr)
        pair = _paired(paired_difference(base[name], rast[name]))
        rows.append(f"| {name} | {_pct(a)} | {_pct(b)} | {_pct(c)} | {_pct(rr)} | {pair} |")
    if len(names) > 1:
        mean = [sum(col) / len(col) for col in zip(*accs)]
        mean_rr = sum(rates) / len(rates) if rates else None
        rows.append(f"| **Average** | {_pct(mean[0])} | {_pct(mean[1])} | {_pct(mean[2])} | {_pct(mean_rr)} | |")
    skipped = sorted((set(base) | set(rast) | set(rl)) - set(names))
    note = f"\n\nSkipped (not in all three runs): {', '.join(skipped)}" if skipped else ""
    return "Accuracy is avg pass@1 (%) over each run's n samples.\n\n" + "\n".join(rows) + note
