"""Issue 17 item 12: a Redis that does not persist, and pages that vanish from their store.

Before this change the agent evicted into a Redis with neither AOF nor RDB; a
Redis restart then lost acknowledged (already punched) pages and the faulting
vCPU waited forever with nothing but a log line. Now:

- the store refuses to take pages from such a Redis unless the URL says
  ``durability=none`` (then it warns loudly);
- a page missing from its store is a critical log line, an event and the
  ``tiermem_agent_pages_missing_total`` metric;
- a policy with ``poison_missing`` answers such a fault with UFFDIO_POISON: the
  guest (a real process guest on the real uffd path) gets SIGBUS instead of
  hanging; without it the vCPU keeps waiting, as before.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.common import EventLog, fill, record, sim_of
from tests.faults.conftest import AgentFactory, redis_url
from tests.helpers.guest import GuestProc
from tests.helpers.servers import RedisServer
from tests.helpers.wait import wait_until
from tiermem.agent.attach import start_handoff
from tiermem.agent.node import Agent
from tiermem.errors import ConfigurationError
from tiermem.model import CycleMode, EventKind, EvictionPolicy
from tiermem.store.base import PageBlob
from tiermem.store.redis_store import RedisPageStore
from tiermem.store.url import open_store

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

PS = 4096
PAGES = 256


@pytest.fixture
def volatile_redis(tmp_path: Path) -> Iterator[RedisServer]:
    d = tmp_path / "volatile"
    d.mkdir()
    srv = RedisServer(d, extra_args=["--appendonly", "no", "--save", ""]).start()
    yield srv
    srv.stop()


def test_a_volatile_redis_is_refused_for_eviction(
    volatile_redis: RedisServer, redis_own: RedisServer, make_agent: AgentFactory
) -> None:
    st = open_store(redis_url(volatile_redis.port))
    assert isinstance(st, RedisPageStore)
    with pytest.raises(ConfigurationError, match=r"does not persist.*durability=none"):
        st.put_pages("vm1", [PageBlob(0, 1, b"\x01" * PS)])
    assert st.usage().pages == 0
    st.close()
    durable = open_store(redis_url(redis_own.port))
    assert isinstance(durable, RedisPageStore) and durable.check_persistence() == "appendonly"
    durable.close()

    # through the agent: the cycle reports the refusal, and nothing is punched
    agent = make_agent({"volatile": redis_url(volatile_redis.port)})
    agent.attach_sim(
        "vm1",
        PAGES * PS,
        EvictionPolicy(interval_ms=20, cold_after=1, store="volatile"),
        workload="uniform",
        vcpus=0,
    )
    sim, guest = sim_of(agent, "vm1")
    fill(guest)
    rep = agent.run_cycle("vm1", CycleMode.EVICT, 20)
    assert rep.pages_evicted == 0 and "does not persist" in rep.error
    assert sim.populated().all() and agent.index.count("vm1") == 0


def _start(make_agent: AgentFactory, url: str) -> tuple[Agent, str]:
    agent = make_agent({"volatile": url})
    start_handoff(agent)
    return agent, agent.settings.handoff_path()


@pytest.mark.uffd
def test_lost_pages_are_loud_and_poison_gives_sigbus(
    volatile_redis: RedisServer, make_agent: AgentFactory
) -> None:
    agent, path = _start(make_agent, redis_url(volatile_redis.port, durability="none"))
    log = EventLog(agent)
    waiting = GuestProc(path, "vm-wait", "1M")
    poisoned = GuestProc(path, "vm-poison", "1M")
    try:
        wait_until(lambda: {"vm-wait", "vm-poison"} <= set(agent.sessions), 10, "both VMs to attach")
        for g, poison in ((waiting, False), (poisoned, True)):
            agent.set_policy(
                g.vm_id,
                EvictionPolicy(cold_after=1, prefetch_pages=0, store="volatile", poison_missing=poison),
            )
            g.cmd(f"touch 0-{PAGES - 1} w")
            assert agent.run_cycle(g.vm_id, CycleMode.EVICT, 100).pages_evicted == PAGES
        assert agent.sessions["vm-poison"].backend.can_poison, "the VMM negotiated UFFD_FEATURE_POISON"

        volatile_redis.kill()  # no AOF, no RDB: every acknowledged page is gone
        volatile_redis.start()

        # poison: the guest's access ends in SIGBUS, within seconds, instead of hanging
        assert poisoned.proc.stdin is not None
        poisoned.proc.stdin.write("touch 5 r\n")
        poisoned.proc.stdin.flush()
        assert poisoned.proc.wait(20) == -signal.SIGBUS
        wait_until(lambda: agent.index.get("vm-poison", 5) is None, 5, "the lost page's entry to go")
        assert agent.index.count("vm-poison") == PAGES - 1  # only the faulting page was declared lost

        # wait (the default): the vCPU stays blocked while the agent keeps retrying
        assert waiting.proc.stdin is not None
        waiting.proc.stdin.write("touch 5 r\n")
        waiting.proc.stdin.flush()
        time.sleep(2)
        assert waiting.proc.poll() is None, "without poison the vCPU waits"
        assert agent.index.get("vm-wait", 5) is not None

        # both are loud: an event naming the missing page, and the metric
        for vm in ("vm-poison", "vm-wait"):
            wait_until(
                lambda vm=vm: any(
                    e.attributes.get("missing") == "true" for e in log.of(EventKind.STORE_ERROR, vm)
                ),  # type: ignore[misc]
                10,
                f"a missing-page event for {vm}",
            )
            assert agent.metrics.pages_missing.labels(vm, "volatile")._value.get() >= 1
        assert any(e.attributes.get("poisoned") == "true" for e in log.of(EventKind.STORE_ERROR, "vm-poison"))
    finally:
        waiting.proc.kill()
        waiting.close()
        poisoned.close()
    record(
        "pages lost from a volatile Redis: loud; poison gives SIGBUS",
        pages_verified=0,
        pages_lost=2 * PAGES,
        hung_vcpus_with_poison=0,
    )
