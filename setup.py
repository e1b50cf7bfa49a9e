"""Build of the C extension pccl_py._native from native/*.c (metadata lives in pyproject.toml)."""

import glob
import os

import numpy
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "native", "*.c")))

setup(
    ext_modules=[
        Extension(
            "pccl_py._native",
            sources=SOURCES,
            include_dirs=["native", numpy.get_include()],
            extra_compile_args=["-O3", "-std=c11", "-fno-strict-aliasing", "-Wall", "-Wextra"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        )
    ]
)
