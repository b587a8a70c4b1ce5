"""`rast bench`: run the benchmark suites in bench/ of the source checkout (they are scripts, not part
of the installed package, because they write results and plots next to the sources)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from rast_engine.errors import RastError

SUITES = ("sampler", "decode", "throughput", "attention", "layer_ops", "gemm", "moe", "lora_kernel", "lora_modules",
          "host_path", "logit_adjust", "slot_occupancy", "speculative", "serving")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help=f"run the benchmark suites in bench/ ({', '.join(SUITES)})",
        description="Run bench/<suite>.py from the source checkout with the current Python; arguments "
                    "after the suite go to the script (e.g. rast bench decode --help).")
    p.add_argument("suite", nargs="?", default="all", choices=(*SUITES, "all"),
                   help="which suite (default all)")
    p.add_argument("suite_args", nargs=argparse.REMAINDER, help="arguments passed to the suite script")
    p.set_defaults(func=run)


def bench_dir() -> Path:
    """bench/ beside the package sources (an editable install), else in the working directory."""
    import rast_engine

    for candidate in (Path(rast_engine.__file__).resolve().parent.parent / "bench", Path.cwd() / "bench"):
        if candidate.is_dir():
            return candidate
    raise RastError("bench/ not found: `rast bench` needs a source checkout (pip install -e . from the "
                    "repository, or run it from the repository root)")


def run(args: argparse.Namespace) -> int:
    root = bench_dir()
    suites = SUITES if args.suite == "all" else (args.suite,)
    if args.suite == "all" and args.suite_args:
        raise RastError("arguments go to one suite at a time: rast bench SUITE [args...]")
    scripts = [root / f"{name}.py" for name in suites]
    missing = [s.name for s in scripts if not s.is_file()]
    if missing and (args.suite != "all" or len(missing) == len(scripts)):
        raise RastError(f"{root / missing[0]} not found; suites present: "
                        f"{', '.join(sorted(p.stem for p in root.glob('*.py'))) or 'none'}")
    _warn_if_another_copy(root.parent)
    worst = 0
    for script in scripts:
        if not script.is_file():
            print(f"rast bench: skipping {script.stem} ({script} not present)", file=sys.stderr)
            continue
        print(f"rast bench: {script.stem}", file=sys.stderr)
        code = subprocess.call([sys.executable, str(script), *args.suite_args], cwd=root.parent)
        worst = worst or code
    return worst


def _warn_if_another_copy(checkout: Path) -> None:
    """The suites import the checkout's sources (they put it first on sys.path); say so when the rast this
    command runs from is another copy, whose built native library the suites then do not use."""
    import rast_kernels

    installed = Path(rast_kernels.__file__).resolve().parent.parent
    if installed != checkout.resolve():
        print(f"rast bench: the suites run {checkout}'s sources, not the installed rast at {installed} (nor its "
              "native library); `pip install -e .` in the checkout benchmarks one copy", file=sys.stderr)
