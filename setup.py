"""Package layout: engine/ installs as ``rast_engine``; there is never a bare ``engine`` import."""
from setuptools import find_packages, setup

engine_packages = ["rast_engine"] + [f"rast_engine.{p}" for p in find_packages("engine")]
kernel_packages = ["rast_kernels"] + [f"rast_kernels.{p}" for p in find_packages("rast_kernels")]

setup(
    packages=kernel_packages + engine_packages,
    package_dir={"rast_engine": "engine", "rast_kernels": "rast_kernels"},
    include_package_data=True,
    package_data={"rast_engine": ["assets/**/*"], "rast_kernels": ["csrc/*"]},
)
