"""The suite's one polling helper: wait for a condition, fail the test with what was awaited.

A timeout here bounds a wait, it claims nothing about speed: it is generous, and
reaching it is a failure of the condition, not of a timing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

__all__ = ["wait_until", "wait_until_async"]


def wait_until(
    pred: Callable[[], object], timeout: float = 20.0, what: str = "condition", step: float = 0.02
) -> None:
    """Poll ``pred`` until it is truthy; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


async def wait_until_async(
    pred: Callable[[], Awaitable[object]], timeout: float = 20.0, what: str = "condition", step: float = 0.02
) -> None:
    """``wait_until`` for an async predicate, sleeping on the running event loop between polls."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(step)
