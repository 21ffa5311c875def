"""Packaging for sglang-elastic.

The top-level ``kernels/`` folder is installed as the subpackage ``sglang_elastic.kernels``
so that Triton kernels live beside (not inside) the pure-Python package in the source tree.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["sglang_elastic", "sglang_elastic.*"])
packages.append("sglang_elastic.kernels")

setup(
    name="sglang-elastic",
    version="0.1.0",
    description="Elastic, fault-tolerant expert parallelism for SGLang MoE serving",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"sglang_elastic.kernels": "kernels"},
    install_requires=[
        # torch is pinned by the setup script (CPU wheel); any recent torch works here.
        "torch>=2.4",
        "numpy>=1.24",
        "pyyaml>=6",
        "scipy>=1.10",  # EPLB: assignment solvers
        "numba>=0.60",  # EPLB: the compiled swap refinement (a numpy fallback runs without it)
        "prometheus_client>=0.17",  # metrics (SGLang uses it too)
    ],
    extras_require={
        "plot": ["matplotlib>=3.7"],
        "nixl": ["nixl>=1.4"],
        "mooncake": ["mooncake-transfer-engine-non-cuda"],
        "sglang": ["sglang==0.5.23"],
        "test": ["pytest>=7", "hypothesis>=6.100", "matplotlib>=3.7", "highspy==1.16.0"],
    },
    entry_points={
        "console_scripts": ["sglang-elastic=sglang_elastic.cli:main"],
        # SGLang runs register() in every process before parsing flags (see docs/sglang.md).
        "sglang.srt.plugins": ["sglang_elastic = sglang_elastic.sglang_plugin:register"],
    },
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
    ],
)
