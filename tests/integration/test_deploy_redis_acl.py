"""The compose stack's Redis, run with its exact ACL script, keeps evicted pages across a crash.

Redis 7.0 replays the effects of a Lua script from the AOF inside MULTI/EXEC, and with
``user default off`` that EXEC is refused on replay (``-NOPERM ... after processing the command
'exec'``): every eviction batch the agent wrote (one script each) vanished after a SIGKILL, while
plain SETs survived. The compose file therefore keeps the default user on behind a random
password. This test runs the compose service's own shell script, so a return of ``default off``
(or any ACL that breaks replay) fails here.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers.capability import binary
from tests.helpers.servers import free_port, wait_port
from tiermem.store.base import PageBlob
from tiermem.store.redis_store import RedisPageStore
from tiermem.store.space import store_space

pytestmark = pytest.mark.redis

COMPOSE = Path(__file__).resolve().parents[2] / "deploy" / "docker-compose.yml"
PS = 4096
SPACE = store_space("node1", "vm1", "00112233aabbccdd")


def _redis_script(acl_path: Path) -> str:
    """The redis service's ``sh -c`` script from the compose file, as the container's shell sees it."""
    svc = yaml.safe_load(COMPOSE.read_text())["services"]["redis"]
    script = str(svc["command"][2]).replace("$$", "$")  # compose's escaping of a literal $
    assert "/tmp/users.acl" in script
    return script.replace("/tmp/users.acl", str(acl_path))


def _start(script: str, tmp: Path, port: int) -> subprocess.Popen[bytes]:
    redis_bin = binary("redis-server")
    assert redis_bin is not None
    env = {
        **os.environ,
        "PATH": f"{Path(redis_bin).parent}:{os.environ.get('PATH', '')}",
        "REDIS_USER": "tiermem",
        "REDIS_PASSWORD": "s3cret-pw",
        "REDIS_BIND": "127.0.0.1",
        "REDIS_PORT": str(port),
    }
    proc = subprocess.Popen(
        ["sh", "-c", script, "redis-server"],
        cwd=tmp,  # the data dir: redis-server's working directory, as /data in the container
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port, 20, proc)
    return proc


def test_script_writes_survive_a_redis_crash_with_the_compose_acl(tmp_path: Path) -> None:
    script = _redis_script(tmp_path / "users.acl")
    port = free_port()
    proc = _start(script, tmp_path, port)
    url = f"redis://tiermem:s3cret-pw@127.0.0.1:{port}/0"
    try:
        store = RedisPageStore.from_url(url)
        pages = [PageBlob(p, 1, bytes([p + 1]) * PS) for p in range(64)]
        stored = store.put_pages(SPACE, pages)  # one Lua script, as an eviction batch
        store.close()
        # the unauthenticated default user is refused: the random password is nobody's
        probe = subprocess.run(
            [binary("redis-cli") or "redis-cli", "-p", str(port), "PING"], capture_output=True, text=True
        )
        assert "NOAUTH" in probe.stdout + probe.stderr
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = _start(script, tmp_path, port)  # replays the AOF
        again = RedisPageStore.from_url(url)
        try:
            assert again.get_pages(SPACE, stored) == [b.data for b in pages]
        finally:
            again.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
