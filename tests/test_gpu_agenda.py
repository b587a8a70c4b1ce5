"""bench/gpu_session.sh is the only way gpu-marked tests ever run (CI has no GPU), and it names their
files explicitly: a file with gpu tests that it does not name would never be run on a GPU. Its benchmark
command lines are parsed here too, since a GPU session has minutes to spend and CI never runs them."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_agenda_runs_every_file_with_gpu_tests() -> None:
    marked = {p.name for p in (ROOT / "tests").glob("test_*.py")
              if re.search(r"pytest\.mark\.gpu\b", p.read_text())}
    named = set(re.findall(r"tests/(test_\w+\.py)", (ROOT / "bench" / "gpu_session.sh").read_text()))
    assert marked, "no gpu-marked tests found: the pattern is stale"
    assert marked <= named, f"gpu tests the GPU agenda never runs: {sorted(marked - named)}"


class _Parsed(Exception):
    """Raised in place of running a suite once its command line has parsed."""


def _agenda_commands() -> list[tuple[str, list[str]]]:
    """(script, arguments) of every benchmark the GPU agenda runs, its shell variables given values."""
    import shlex

    text = (ROOT / "bench" / "gpu_session.sh").read_text().replace("\\\n", " ")
    values = {"$out": "/tmp/agenda-out", "$RAST_COMMIT": "abc1234", "$pairing": "7b+1.5b"}
    commands, decode_fixed = [], None
    for line in text.splitlines():
        line = line.split(" 2>&1", 1)[0]
        for var, value in values.items():
            line = line.replace(f'"{var}"', value).replace(var, value)
        if '"$@"' in line:  # decode()'s body: the arguments it puts before each call's own
            decode_fixed = shlex.split(line.split("bench/decode.py", 1)[1].split('"$@"')[0])
        elif m := re.search(r"python3 bench/(\w+\.py)(.*)", line):
            commands.append((m.group(1), shlex.split(m.group(2))))
        elif m := re.match(r'\s*decode "\$\(\w+[^)]*\)"(.*)', line):
            assert decode_fixed is not None, "a decode call before decode()'s body: stale pattern"
            commands.append(("decode.py", [*decode_fixed, *shlex.split(m.group(1))]))
    return commands


def test_the_gpu_agendas_benchmark_command_lines_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag the suite does not take would cost a GPU stage its run; every command line the agenda gives
    must parse (decode.py with its CUDA defaults, which a CPU otherwise replaces by the tiny run)."""
    import argparse
    import sys

    from bench_runs import load_bench

    commands = _agenda_commands()
    assert {s for s, _ in commands} >= {"decode.py", "sampler.py", "sampler_plans.py", "gemm.py", "attention.py",
                                        "layer_ops.py"}, commands
    assert sum(s == "decode.py" for s, _ in commands) >= 6, "the decode calls were not all found: stale pattern"
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise _Parsed(original(self, args, namespace))

    for script, args in commands:
        suite = load_bench(script)
        if script == "decode.py":
            parsed, device = suite.parse([*args, "--device", "cuda"])
            assert device.type == "cuda" and not parsed.tiny, args
            continue
        monkeypatch.setattr(sys, "argv", [script, *args])
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        with pytest.raises(_Parsed):
            suite.main()
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)


def test_benchmark_flags_are_never_abbreviated(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the rast CLI's: `rast bench decode --tin` must not run --tiny, nor a flag added later change an
    old command line."""
    import sys

    from bench_runs import load_bench

    for argv in (["--tin"], ["--pair", "tiny"]):
        with pytest.raises(SystemExit):
            load_bench("decode.py").parse(argv)
    with pytest.raises(SystemExit):
        load_bench("sampler.py").main(["--qui"])
    monkeypatch.setattr(sys, "argv", ["gemm.py", "--qui"])  # the suites that share bench/common.quick_args
    with pytest.raises(SystemExit):
        load_bench("gemm.py").main()
