"""Reliability suite: injected faults, fuzzed input, held load, and full memory verification."""
