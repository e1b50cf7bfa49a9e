"""Build of the C extension pccl_py.kernels._native from native/*.c (metadata lives in pyproject.toml)."""

import glob
import os

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "native", "*.c")))

setup(
    ext_modules=[
        Extension(
            "pccl_py.kernels._native",
            sources=SOURCES,
            include_dirs=["native"],
            libraries=["dl", "pthread"],  # libcrypto is loaded at run time (native/seal.c)
            # Same bits on every machine: no FMA contraction, no fast-math, no -march
            # (baseline ISA; the loops are auto-vectorised for SSE2 / NEON).
            extra_compile_args=[
                "-O3",
                "-std=gnu11",
                "-ffp-contract=off",
                "-fno-fast-math",
                "-fno-trapping-math",  # lets selects vectorise; never changes a value
                "-fno-strict-aliasing",
                "-Wall",
                "-Wextra",
            ],
        )
    ]
)
