"""Build the optional native extension ``tiermem._native`` (everything else is in pyproject.toml).

It is optional: without a C compiler or the zstd/lz4/libsodium headers the install still
succeeds and tiermem runs on its pure-Python paths (``tiermem doctor`` says which is active).
"""

import os

from setuptools import Extension, setup

# hiredis (libhiredis-dev) lets the fault thread read Redis pages; without it Redis faults stay in Python.
HIREDIS = os.path.exists("/usr/include/hiredis/hiredis.h")

setup(
    ext_modules=[
        Extension(
            "tiermem._native",
            sources=["csrc/module.c", "csrc/scan.c", "csrc/faults.c", "csrc/redis_src.c"],
            depends=["csrc/native.h"],
            libraries=["zstd", "lz4", "sodium"] + (["hiredis"] if HIREDIS else []),
            define_macros=[("TM_HAVE_HIREDIS", "1")] if HIREDIS else [],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
