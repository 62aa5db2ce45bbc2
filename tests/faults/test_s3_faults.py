"""S3 errors and slowness under a sim guest: 500/503 during eviction and faults, a slow link, an outage.

The S3 server is real (SeaweedFS, or moto's server); errors are injected on the
agent's own boto3 client with a botocore ``before-send`` hook that answers some
requests with a 500 InternalError or a 503 SlowDown without sending them, so
botocore's standard retry mode and then the agent's own backoff are exercised
exactly as against a struggling S3. Latency comes from the TCP fault proxy in
front of the server. Each scenario ends with the guest verifying every page.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from botocore.awsrequest import AWSResponse
from botocore.compat import HTTPHeaders

from tests.faults.common import (
    EventLog,
    ServeLog,
    check_payloads,
    entries_for,
    fill,
    holes_of,
    open_direct,
    record,
    sim_of,
    unbacked_punches,
)
from tests.faults.conftest import AgentFactory
from tests.faults.toxic_proxy import ToxicProxy
from tests.helpers.servers import S3Server
from tiermem.agent.cycle import EVICT_BATCH_PAGES
from tiermem.model import CycleMode, EventKind, EvictionPolicy
from tiermem.sim.kernel import SimKernel
from tiermem.store.s3_store import S3PageStore

pytestmark = [pytest.mark.s3, pytest.mark.timeout(120)]

PS = 4096
_BODIES = {
    500: b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
    b"<Message>We encountered an internal error. Please try again.</Message></Error>",
    503: b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>",
}


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.body


class S3Chaos:
    """Answers a fraction of the client's S3 requests with a 500 or a 503, per operation."""

    def __init__(self, store: S3PageStore, seed: int = 0) -> None:
        self.rates: dict[str, float] = {}
        self.rng = random.Random(seed)
        self.injected: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self._lock = threading.Lock()
        store.client.meta.events.register("before-send.s3", self._hook)

    def set(self, **rates: float) -> None:
        """Error probability per operation name (PutObject=0.5, GetObject=1.0); 0 turns one off."""
        self.rates.update(rates)

    def _hook(self, request: Any, event_name: str, **_: Any) -> AWSResponse | None:
        op = event_name.rsplit(".", 1)[-1]
        with self._lock:
            if self.rng.random() >= self.rates.get(op, 0.0):
                self.sent[op] += 1
                return None
            self.injected[op] += 1
            status = self.rng.choice((500, 503))
        headers = HTTPHeaders()
        headers["Content-Type"] = "application/xml"
        return AWSResponse(request.url, status, headers, _Raw(_BODIES[status]))


def touch_all(sim: SimKernel, pages: list[int]) -> None:
    """A vCPU reading ``pages`` one by one."""
    for p in pages:
        sim.access(int(p))


@pytest.fixture
def s3_proxy(s3_srv: S3Server) -> Iterator[ToxicProxy]:
    p = ToxicProxy("127.0.0.1", s3_srv.port).start()
    yield p
    p.stop()


def s3_url(srv: S3Server, port: int, prefix: str) -> str:
    return (
        f"s3://{srv.bucket}/{prefix}?endpoint=http://127.0.0.1:{port}&region={srv.region}&retries=2"
        "&timeout=5&connect_timeout=1&segment_mib=1"
    )


def test_s3_errors_and_slowness_during_eviction_and_faults(
    make_agent: AgentFactory, s3_srv: S3Server, s3_proxy: ToxicProxy
) -> None:
    prefix = f"chaos-{random.randrange(1 << 30):x}"
    agent = make_agent({"s3": s3_url(s3_srv, s3_proxy.port, prefix)})
    log = EventLog(agent)
    n = 2 * EVICT_BATCH_PAGES
    agent.attach_sim(
        "vm1",
        n * PS,
        EvictionPolicy(interval_ms=20, cold_after=1, prefetch_pages=8, store="s3"),
        workload="zipf:1.0",
        vcpus=0,
        seed=11,
    )
    sim, guest = sim_of(agent, "vm1")
    fill(guest)
    store = agent.store("s3")
    assert isinstance(store, S3PageStore)
    chaos = S3Chaos(store, seed=1)
    served = ServeLog(store)

    # --- eviction while half the PUTs fail: batches stop or go through, never half-punched -------
    chaos.set(PutObject=0.7)  # with botocore's retries, about a third of the segment PUTs still fail
    stopped = 0
    for _ in range(12):
        rep = agent.run_cycle("vm1", CycleMode.EVICT, 20)
        stopped += bool(rep.error)
        holes = holes_of(agent, "vm1")
        assert unbacked_punches(agent.index, "vm1", holes) == []
        assert holes == set(agent.index.evicted_pages("vm1"))
        if agent.index.count("vm1") == n:
            break
    assert agent.index.count("vm1") > 0
    assert chaos.injected["PutObject"] > 0
    chaos.set(PutObject=0.0)
    direct = open_direct(s3_url(s3_srv, s3_srv.port, prefix), "s3", agent.data_dir)
    evicted = agent.index.evicted_pages("vm1")
    space = agent.sessions["vm1"].space
    assert check_payloads(direct, space, [e.stored for e in entries_for(agent.index, "vm1", evicted)]) == 0
    direct.close()

    # --- faults while 30% of GETs fail and the link is slow ------------------------------------
    chaos.set(GetObject=0.3)
    s3_proxy.latency(0.005)
    readers = [
        threading.Thread(target=touch_all, args=(sim, ps.tolist()), daemon=True)
        for ps in np.array_split(np.array(evicted[:: max(1, len(evicted) // 96)]), 4)
    ]
    for t in readers:
        t.start()
    for _ in range(3):
        guest.step(1)  # the guest's own accesses fault too
    for t in readers:
        t.join(60)
        assert not t.is_alive()

    # --- a full GET outage: faults wait, then succeed -----------------------------------------
    s3_proxy.latency(0)
    left = agent.index.evicted_pages("vm1")
    assert left, "some pages must still be evicted for the outage phase"
    chaos.set(GetObject=1.0)
    reader = threading.Thread(target=touch_all, args=(sim, left[:8]), daemon=True)
    reader.start()
    reader.join(1.5)
    assert reader.is_alive(), "a fault returned during a total S3 read outage"
    assert not sim.populated()[left[0]]
    chaos.set(GetObject=0.0)
    reader.join(30)
    assert not reader.is_alive()

    assert log.of(EventKind.STORE_ERROR, "vm1")
    assert served.served_differently() == []
    chaos.set(GetObject=0.05)  # verify faults every evicted page back through a still-flaky S3
    checked, lost = guest.verify()
    assert lost == 0
    assert served.served_differently() == []
    record(
        "s3 500/503 + slow link during eviction and faults",
        pages_verified=checked,
        pages_lost=lost,
        injected_put=chaos.injected["PutObject"],
        injected_get=chaos.injected["GetObject"],
        requests_sent=sum(chaos.sent.values()),
        cycles_stopped=stopped,
        agent_store_errors=agent.sessions["vm1"].counters.store_errors,
    )
    agent.detach("vm1", purge=True)
