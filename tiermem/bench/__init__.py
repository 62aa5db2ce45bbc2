"""Benchmark scenarios behind `tiermem bench`; each prints a baseline measured in the same run."""
