"""The native fault thread's lifecycle under concurrent callers: stop() from several threads at once
(a session closing while its VMM's connection drops) joins the thread once, while Python keeps
calling the mirror and drain methods; a stopped path never restarts; a FaultPath whose ``__init__``
failed closes no fd it never opened.

Each check runs in a child interpreter: before the fix, a double ``pthread_join`` segfaulted or hung
the process, and that must fail this test, not kill the test run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tiermem import native

pytestmark = pytest.mark.skipif(
    native.mod is None or not hasattr(native.mod, "FaultPath"), reason=f"native extension: {native.reason}"
)

_CONCURRENT_STOP = """
import os, threading
from tiermem import native

FP = native.mod.FaultPath
for i in range(ROUNDS):
    r, w = os.pipe()  # never readable: the thread waits in poll as on an idle uffd
    fp = FP(r, 0x10000000, 4096, 64)
    fp.add_dir("/nonexistent")
    fp.start()
    go = threading.Barrier(4)
    errors = []

    def stopper():
        go.wait()
        fp.stop()

    def bookkeeper():  # the drainer and PageIndex mirror updates, racing the stop
        go.wait()
        try:
            for g in range(20):
                fp.put_many([(g % 64, g + 1, 0, 0, 0, "seg", 0, 100)])
                fp.remove(g % 64, g + 1)
                fp.drain()
                fp.stats()
                fp.enabled = bool(g & 1)
        except Exception as e:
            errors.append(e)

    ts = [threading.Thread(target=f) for f in (stopper, stopper, bookkeeper)]
    for t in ts:
        t.start()
    go.wait()
    fp.stop()
    for t in ts:
        t.join()
    assert not errors, errors
    assert not fp.running and fp.stats()["running"] == 0
    fp.stop()  # idempotent after the join
    try:
        fp.start()
    except RuntimeError:
        pass
    else:
        raise AssertionError("a stopped FaultPath started again (its uffd may be closed and reused)")
    del fp
    os.close(r)
    os.close(w)
print("ok", ROUNDS)
"""

_FAILED_INIT = """
import gc, os
from tiermem import native

for bad in ((0, 0x10000000, 1000, 64), (0, 0x10000000, 4096, 0), ("x", 0, 4096, 1)):
    try:
        native.mod.FaultPath(*bad)
    except (ValueError, TypeError):
        pass
    else:
        raise AssertionError(f"FaultPath{bad} was accepted")
    gc.collect()
    os.fstat(0)  # stdin is still open: dealloc of a half-made FaultPath closed nothing
print("ok")
"""


def _run(code: str, timeout: float) -> str:
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    try:
        out = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.PIPE,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the child hung (a thread joined twice?): {e.stderr!r}")
    assert out.returncode == 0, f"child exited {out.returncode}: {out.stderr[-3000:]}"
    return out.stdout


def test_concurrent_stop_joins_the_thread_once_while_python_updates_the_mirror() -> None:
    rounds = 300
    assert _run(_CONCURRENT_STOP.replace("ROUNDS", str(rounds)), timeout=30).split() == ["ok", str(rounds)]


def test_a_failed_init_closes_no_fd() -> None:
    assert _run(_FAILED_INIT, timeout=30).strip() == "ok"
