"""Issue 17 item 2: agents that share one store never touch each other's pages.

The documented DaemonSet gives every node the same Redis URL or S3 prefix, and
fleets reuse VM ids. Before this change keys held only (vm, page, generation)
and generations restart at 1 in every agent, so node 2's eviction of its "vm1"
overwrote node 1's only copies and node 2's purge deleted them. Now every key
lives under ``<node>~<vm>~<incarnation>``: here two real agents with the same VM
id share one real redis-server (and one SeaweedFS bucket prefix); node 2 evicts,
then purges, and node 1 still gets every page back intact.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.faults.common import fill, record, sim_of
from tests.faults.conftest import AgentFactory, redis_url
from tests.helpers.servers import RedisServer, S3Server
from tiermem.model import CycleMode, EvictionPolicy

pytestmark = pytest.mark.timeout(120)

PS = 4096
PAGES = 128


def _shared_url(kind: str, request: pytest.FixtureRequest) -> str:
    if kind == "redis":
        srv: RedisServer = request.getfixturevalue("redis_own")
        return redis_url(srv.port)
    s3: S3Server = request.getfixturevalue("s3_srv")
    return s3.url(f"fleet-{os.urandom(4).hex()}") + "&segment_mib=1"


@pytest.mark.parametrize(
    "kind", [pytest.param("redis", marks=pytest.mark.redis), pytest.param("s3", marks=pytest.mark.s3)]
)
def test_two_nodes_same_vm_id_one_store(
    kind: str, make_agent: AgentFactory, request: pytest.FixtureRequest
) -> None:
    url = _shared_url(kind, request)
    n1 = make_agent({"shared": url}, node_id="n1")
    n2 = make_agent({"shared": url}, node_id="n2")
    pol = EvictionPolicy(interval_ms=20, cold_after=1, prefetch_pages=0, store="shared")
    for agent, seed in ((n1, 1), (n2, 2)):  # same id, same size, different contents
        agent.attach_sim("vm1", PAGES * PS, pol, workload="uniform", vcpus=0, seed=seed)
        fill(sim_of(agent, "vm1")[1], times=seed)
    assert n1.run_cycle("vm1", CycleMode.EVICT, 20).pages_evicted == PAGES
    assert n2.run_cycle("vm1", CycleMode.EVICT, 20).pages_evicted == PAGES  # same pages, same generations
    s1, s2 = n1.sessions["vm1"].space, n2.sessions["vm1"].space
    assert s1 != s2 and s1.startswith("n1~vm1~") and s2.startswith("n2~vm1~")
    assert n1.store("shared").usage(s1).pages == PAGES and n2.store("shared").usage(s2).pages == PAGES

    # node 2 is done with its vm1: detach with purge must delete node 2's pages only
    assert n2.detach("vm1", purge=True) >= PAGES
    assert n2.store("shared").usage(s2).pages == 0
    assert n1.store("shared").usage(s1).pages == PAGES

    # node 1's guest gets every page back, each one verified against what it wrote
    prog = n1.drain("vm1")
    assert prog.done and prog.pages_restored == PAGES
    checked, lost = sim_of(n1, "vm1")[1].verify()
    assert checked == PAGES and lost == 0
    assert n1.sessions["vm1"].counters.integrity_errors == 0
    record(f"two nodes, one VM id, one shared {kind} store", pages_verified=checked, pages_lost=lost)


def test_same_vm_id_reattached_as_a_fresh_vm_gets_a_new_namespace(
    make_agent: AgentFactory, tmp_path: Path
) -> None:
    # the local store shares the trick: a new incarnation never sees the old one's keys
    agent = make_agent({"store": f"file://{tmp_path}/pages"})
    pol = EvictionPolicy(interval_ms=20, cold_after=1, prefetch_pages=0, store="store")
    agent.attach_sim("vm1", 16 * PS, pol, workload="uniform", vcpus=0)
    first = agent.sessions["vm1"].space
    agent.detach("vm1")
    agent.attach_sim("vm1", 16 * PS, pol, workload="uniform", vcpus=0)
    assert agent.sessions["vm1"].space != first
