"""Real servers for tests: redis-server and an S3 API server (SeaweedFS ``weed mini``, or moto's server).

Each server runs as a child process on free loopback ports with its own
temporary directory, and is killed at teardown. Nothing here is an in-process
fake: clients talk to them over TCP exactly as in production.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def _bin(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


@dataclass
class RedisServer:
    """A redis-server child process."""

    tmpdir: Path
    password: str | None = None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        """redis:// URL for clients."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start (or restart on the same port and data dir)."""
        binary = _bin("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not installed (make test installs it)")
        if not self.port:
            self.port = free_port()
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.tmpdir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--protected-mode",
            "no",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(
            args + self.extra_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port, 20, self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL the server (data written with appendfsync always survives)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """Terminate the server."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class S3Server:
    """An S3 API server child process: SeaweedFS ``weed mini`` or moto's server mode."""

    tmpdir: Path
    port: int = 0
    kind: str = ""
    proc: subprocess.Popen[bytes] | None = None
    access_key: str = "tiermem"
    secret_key: str = "tiermem-secret"
    bucket: str = "tiermem-test"
    region: str = "us-east-1"

    @property
    def endpoint(self) -> str:
        """HTTP endpoint URL."""
        return f"http://127.0.0.1:{self.port}"

    def url(self, prefix: str = "") -> str:
        """An s3:// store URL for tiermem."""
        prefix = prefix or uuid.uuid4().hex[:8]
        return f"s3://{self.bucket}/{prefix}?endpoint={self.endpoint}&region={self.region}"

    def env(self) -> dict[str, str]:
        """Credentials for the standard chain."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def start(self, prefer: str = "weed", fallback: bool = True) -> S3Server:
        """Start SeaweedFS if its binary is there (else moto, when ``fallback``), and create the bucket."""
        weed = _bin("weed")
        if prefer == "weed" and (weed is not None or not fallback):
            if weed is None:
                raise RuntimeError("SeaweedFS `weed` is not installed")
            try:
                self._start_weed(weed)
            except (RuntimeError, TimeoutError):
                self.stop()
                if not fallback:
                    raise
                self._start_moto()
        else:
            self._start_moto()
        self._ensure_bucket()
        return self

    def _start_weed(self, weed: str) -> None:
        self.kind = "seaweedfs"
        self.port = free_port()
        ports = {k: free_port() for k in ("master", "volume", "filer")}
        env = {**os.environ, **self.env(), "S3_BUCKET": self.bucket}
        args = [
            weed,
            "mini",
            f"-dir={self.tmpdir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            "-webdav=false",
            "-admin.ui=false",
        ]
        # gRPC ports default to port+10000; they must be free too.
        for k in ("master", "volume", "filer"):
            args.append(f"-{k}.port.grpc={free_port()}")
        args.append(f"-s3.port.grpc={free_port()}")
        log = open(self.tmpdir / "weed.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        # weed normally serves S3 in a few seconds; past 30 s something is wrong: fall back to moto.
        wait_port(self.port, 30, self.proc)
        self._wait_ready(30)

    def _start_moto(self) -> None:
        self.kind = "moto"
        self.port = free_port()
        moto = _bin("moto_server")
        args = [moto] if moto else [sys.executable, "-m", "moto.server"]
        self.proc = subprocess.Popen(
            [*args, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_port(self.port, 30, self.proc)

    def client(self) -> S3Client:
        """A boto3 S3 client for this server (for assertions and corruption tests)."""

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2, "mode": "standard"}),
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self.client().list_buckets()
                return
            except Exception as e:  # the filer may still be starting
                last = e
                time.sleep(0.3)
        raise TimeoutError(f"S3 server not ready: {last}")

    def _ensure_bucket(self) -> None:
        c = self.client()
        deadline = time.monotonic() + 30
        while True:
            try:
                c.head_bucket(Bucket=self.bucket)
                return
            except Exception:
                try:
                    c.create_bucket(Bucket=self.bucket)
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.3)

    def stop(self) -> None:
        """Terminate the server and its children."""
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@contextlib.contextmanager
def redis_server(tmpdir: Path, password: str | None = None) -> Iterator[RedisServer]:
    """Context manager around a RedisServer."""
    srv = RedisServer(tmpdir, password=password).start()
    try:
        yield srv
    finally:
        srv.stop()


@contextlib.contextmanager
def s3_server(tmpdir: Path, prefer: str = "weed") -> Iterator[S3Server]:
    """Context manager around an S3Server."""
    srv = S3Server(tmpdir).start(prefer)
    try:
        yield srv
    finally:
        srv.stop()
