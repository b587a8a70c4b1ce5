"""Benchmark files: JSONL, one problem per line, with `problem`, `answer` and an optional `id`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rast_engine.errors import RastError


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str


def read_utf8(path: Path, what: str) -> str:
    """The text of a user's file; a RastError naming it (``what``: "data file") when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RastError(f"{what} {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load_problems(path: str | Path, limit: int | None = None) -> list[Problem]:
    """Every problem in a JSONL file, in file order. Blank lines are skipped; ids default to the line
    number and must be unique (they key the saved samples when a run resumes)."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise RastError(f"limit must be >= 1 (or None for every problem), got {limit}")
    if not path.is_file():
        raise RastError(f"data file {str(path)!r} does not exist")
    problems: list[Problem] = []
    seen: set[str] = set()
    lines = read_utf8(path, "data file").split("\n")  # not splitlines: JSON strings may hold U+2028
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line, parse_float=str)  # an answer keeps its spelling: 0.00001, not 1e-05
        except json.JSONDecodeError as exc:
            raise RastError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise RastError(f"{where}: expected a JSON object with 'problem' and 'answer'")
        missing = [k for k in ("problem", "answer") if k not in row]
        if missing:
            raise RastError(f"{where}: missing field(s) {', '.join(missing)} (see docs/eval.md to convert "
                            "a benchmark file)")
        if not isinstance(row["problem"], str) or not row["problem"].strip():
            raise RastError(f"{where}: 'problem' must be a non-empty string")
        answer = row["answer"]  # a bool is no answer: JSON's true would be graded as the string "True"
        if not isinstance(answer, (str, int)) or isinstance(answer, bool) or not str(answer).strip():
            raise RastError(f"{where}: 'answer' must be a non-empty string or a number")
        pid = str(row.get("id", lineno))
        if pid in seen:
            raise RastError(f"{where}: duplicate id {pid!r}")
        seen.add(pid)
        problems.append(Problem(pid, row["problem"], str(row["answer"])))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise RastError(f"data file {str(path)!r} holds no problems")
    return problems
