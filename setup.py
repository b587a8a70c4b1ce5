"""Package layout: engine/ installs as ``rast_engine``; there is never a bare ``engine`` import.

The native CPU sampler (CMakeLists.txt, rast_kernels/csrc) is compiled by the ``build_native`` step, which
runs as part of ``build`` for ``pip install .`` and for ``pip install -e .`` alike and puts the library
inside the rast_kernels package. It needs cmake and a C++17 compiler, never torch. When either is missing
or the build fails, the install still succeeds: one line reports that the native backend is absent, and
rast_kernels serves CPU tensors with its torch backend.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Command, find_namespace_packages, setup
from setuptools.command.build import build
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
LIBRARY = {"win32": "rast_native.dll", "darwin": "librast_native.dylib"}.get(sys.platform, "librast_native.so")

# Namespace discovery also lists the data-only folders (assets/toy/*, evaluation/data), so their files
# ship as package data without setuptools' "ambiguous configuration" warnings.
engine_packages = ["rast_engine"] + [f"rast_engine.{p}" for p in find_namespace_packages("engine", exclude=["*__pycache__*"])]
kernel_packages = ["rast_kernels"] + [f"rast_kernels.{p}" for p in find_namespace_packages("rast_kernels", exclude=["*__pycache__*"])]


def _cmake() -> str | None:
    """System cmake, else the one from the `cmake` PyPI package if it happens to be installed."""
    found = shutil.which("cmake")
    if found:
        return found
    try:
        import cmake  # type: ignore[import-not-found]
    except ImportError:
        return None
    candidate = Path(cmake.CMAKE_BIN_DIR) / "cmake"
    return str(candidate) if candidate.exists() else None


def _first_error(log: str) -> str:
    """The most telling line of a failed cmake run: the first line after one that mentions an error."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "error" in line.lower():
            return " ".join(lines[i:i + 2])[:300]
    return lines[-1][:300] if lines else "no output"


def _cache_source(build_dir: Path) -> str | None:
    """The source directory an existing CMakeCache.txt in build_dir was configured for (None: no cache)."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return None
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:INTERNAL="):
            return str(Path(line.split("=", 1)[1]).resolve())
    return None


def _build_library(target_dir: Path, build_dir: Path) -> str | None:
    """Configure and build CMakeLists.txt so the library lands in target_dir; None or the failure reason."""
    cmake = _cmake()
    if cmake is None:
        return "cmake not found"
    build_dir.mkdir(parents=True, exist_ok=True)
    configure = [cmake, "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DRAST_NATIVE_OUTPUT_DIR={target_dir}"]
    compile_ = [cmake, "--build", str(build_dir), "--config", "Release", "--parallel", str(os.cpu_count() or 1)]
    for step, cmd in (("configure", configure), ("build", compile_)):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"cmake {step} could not run: {err}"
        if done.returncode != 0:
            return f"cmake {step} failed: {_first_error(done.stderr + done.stdout)}"
    if not (target_dir / LIBRARY).is_file():
        return f"the build produced no {LIBRARY}"
    return None


class build_native(Command):
    """Compile the native CPU sampler into the rast_kernels package (the source tree when editable)."""

    description = "build the native CPU sampler library with cmake"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        self.build_lib: str | None = None
        self.build_temp: str | None = None
        self.editable_mode = False  # set by setuptools' editable_wheel
        self._outputs: list[str] = []

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_lib", "build_lib"), ("build_temp", "build_temp"))

    def run(self) -> None:
        target = ROOT / "rast_kernels" if self.editable_mode else Path(self.build_lib) / "rast_kernels"
        target.mkdir(parents=True, exist_ok=True)
        # a library from an earlier build must not ship when this one fails (it would be loaded, stale)
        (target / LIBRARY).unlink(missing_ok=True)
        build_dir = Path(self.build_temp).resolve() / "rast_native"
        if _cache_source(build_dir) not in (None, str(ROOT.resolve())):  # a moved checkout: cmake refuses it
            shutil.rmtree(build_dir)
        error = _build_library(target.resolve(), build_dir)
        if error:
            print(f"rast: native CPU backend absent ({error}); CPU tensors use the torch backend", file=sys.stderr)
            return
        print(f"rast: native CPU backend built: {target / LIBRARY}", file=sys.stderr)
        if not self.editable_mode:
            self._outputs = [str(target / LIBRARY)]

    def get_outputs(self) -> list[str]:
        return self._outputs

    def get_output_mapping(self) -> dict[str, str]:
        return {}


class BinaryDistribution(Distribution):
    """The wheel may carry a compiled library, so it is tagged for this platform, not py3-none-any."""

    def has_ext_modules(self) -> bool:
        return True


build.sub_commands = [*build.sub_commands, ("build_native", None)]

setup(
    distclass=BinaryDistribution,
    cmdclass={"build_native": build_native},
    packages=kernel_packages + engine_packages,
    package_dir={"rast_engine": "engine", "rast_kernels": "rast_kernels"},
    include_package_data=True,
    # The toy checkpoints and tokenizers, the eval sample, the C++ sources for a rebuild.
    package_data={"": ["*.json", "*.jsonl", "*.txt", "*.safetensors", "*.cpp", "*.h"]},
)
