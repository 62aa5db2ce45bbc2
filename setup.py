"""Build the optional native extension ``tiermem._native`` (everything else is in pyproject.toml).

It is optional: without a C compiler or the zstd/lz4/libsodium headers the install still
succeeds and tiermem runs on its pure-Python paths (``tiermem doctor`` says which is active).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tiermem._native",
            sources=["csrc/module.c", "csrc/scan.c", "csrc/faults.c"],
            depends=["csrc/native.h"],
            libraries=["zstd", "lz4", "sodium"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
