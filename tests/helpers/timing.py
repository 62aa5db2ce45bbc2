"""Test time limits that stretch on slow machines: the kernel-VM tier runs under TCG, 20-25x slower.

``TIERMEM_TEST_TIME_SCALE`` (a float, default 1) multiplies every wait written with :func:`scaled`
and every pytest-timeout limit (tests/conftest.py). ``make test-rwp`` sets it inside the VM. It only
widens how long a test waits for something to happen, never what the test asserts.
"""

from __future__ import annotations

import os


def time_scale() -> float:
    """The factor from ``TIERMEM_TEST_TIME_SCALE`` (1 when unset or not a positive number)."""
    try:
        f = float(os.environ.get("TIERMEM_TEST_TIME_SCALE", "1"))
    except ValueError:
        return 1.0
    return f if f > 0 else 1.0


def scaled(seconds: float) -> float:
    """``seconds`` times the time scale."""
    return seconds * time_scale()
