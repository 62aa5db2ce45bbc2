"""Promotion-rate SLO: back off when faults on evicted pages exceed the SLO, tighten when far below."""

from __future__ import annotations

import pytest

from tests.unit.test_control_scheduler import T0, add, make_env
from tiermem.api import PolicyScope
from tiermem.control.policies import apply_adjustment
from tiermem.control.scheduler import SchedulerConfig
from tiermem.control.slo import SloConfig, SloController
from tiermem.model import EventKind, EvictionCap, EvictionPolicy, VmStatus

SLO = 0.002  # 0.2% of evicted pages per minute


def status(faults: int, evicted: int, t: float) -> VmStatus:
    return VmStatus("vm-1", faults_served=faults, evicted_pages=evicted, updated_unix_ms=int(t * 1000))


def test_rate_is_faults_per_evicted_page_per_minute() -> None:
    c = SloController(SloConfig(window_ms=60_000))
    for i in range(7):  # 10,000 evicted pages, 100 faults every 10 s: 600/min = 6%/min
        c.observe(status(100 * i, 10_000, T0 + 10 * i), int((T0 + 10 * i) * 1000))
    rate, evicted = c.measure("vm-1", int((T0 + 60) * 1000)) or (None, None)
    assert rate == pytest.approx(0.06) and evicted == 10_000
    c.observe(status(5, 10_000, T0 + 70), 0)  # the agent's counter restarted: history dropped
    assert c.measure("vm-1", int((T0 + 70) * 1000)) is None


async def test_backoff_above_slo_then_tighten_back_to_the_operator_policy() -> None:
    env = await make_env(SchedulerConfig(jitter=0.0))
    env.sched.slo.config = SloConfig(window_ms=60_000, tighten_windows=3)
    await add(env, "n1", "vm-1")
    operator = EvictionPolicy(
        interval_ms=10_000, cold_after=3, max_evict=EvictionCap(pages=800), slo_promotion_rate=SLO
    )
    await env.book.set(PolicyScope.for_vm("vm-1"), operator)
    faults, t = 0, T0

    async def minute(faults_per_min: int) -> None:
        nonlocal faults, t
        for _ in range(6):
            t += 10
            faults += faults_per_min // 6
            env.clock.set(t)
            await env.reg.heartbeat("n1", [status(faults, 10_000, t)])
            await env.sched.sync()

    await minute(0)  # first window: nothing to compare yet
    await minute(600)  # 6%/min, 30x the SLO
    eff = await env.book.effective("vm-1")
    assert eff.adjusted and eff.level == 1
    assert (eff.policy.cold_after, eff.policy.max_evict.pages) == (6, 400)
    adj = [e for e in await env.reg.state.events_after(0) if e.kind is EventKind.POLICY_ADJUSTED]
    assert (
        len(adj) == 1 and "exceeds the SLO" in adj[0].message and adj[0].attributes["direction"] == "backoff"
    )
    await minute(600)
    assert (await env.book.effective("vm-1")).level == 2
    # the next order carries the adjusted policy
    env.clock.set(t + 10)
    await env.step()
    sent = env.agents.orders[-1].policy
    assert (
        sent is not None
        and sent.cold_after == 12
        and sent.version == (await env.book.effective("vm-1")).policy.version
    )

    for _ in range(12):
        await minute(0)  # far below (< 25% of) the SLO
    # (the first window after the burst still straddles it, so one more back-off may happen first)
    eff = await env.book.effective("vm-1")
    assert not eff.adjusted and eff.policy.cold_after == 3 and eff.policy.max_evict.pages == 800
    for _ in range(4):
        await minute(0)  # never tighter than the operator's policy
    eff = await env.book.effective("vm-1")
    assert eff.level == 0 and eff.policy == operator.with_changes(version=eff.policy.version)
    dirs = [
        e.attributes["direction"]
        for e in await env.reg.state.events_after(0)
        if e.kind is EventKind.POLICY_ADJUSTED
    ]
    ups = dirs.count("backoff")
    assert dirs == ["backoff"] * ups + ["tighten"] * ups and ups in (2, 3)
    levels = [
        int(e.attributes["level"])
        for e in await env.reg.state.events_after(0)
        if e.kind is EventKind.POLICY_ADJUSTED
    ]
    assert levels == [*range(1, ups + 1), *range(ups - 1, -1, -1)]
    # tightening needs three low windows in a row: the steps down are at least three windows apart
    times = [
        e.time_unix_ms for e in await env.reg.state.events_after(0) if e.kind is EventKind.POLICY_ADJUSTED
    ]
    assert all(b - a >= 3 * 60_000 for a, b in zip(times[ups:], times[ups + 1 :], strict=False))


async def test_rate_between_quarter_and_full_slo_changes_nothing_and_no_slo_means_no_control() -> None:
    env = await make_env(SchedulerConfig(jitter=0.0))
    await add(env, "n1", "vm-1")
    await env.book.set(PolicyScope.for_vm("vm-1"), EvictionPolicy(slo_promotion_rate=SLO))
    await env.book.adjust("vm-1", 1, "start backed off")
    env.sched.slo.config = SloConfig(window_ms=60_000, tighten_windows=2)
    faults = 0
    for k in range(1, 60):  # 12 faults/min on 10,000 pages = 0.12%/min: between 25% and 100% of the SLO
        faults += 2
        env.clock.set(T0 + 10 * k)
        await env.reg.heartbeat("n1", [status(faults, 10_000, T0 + 10 * k)])
        await env.sched.sync()
    assert (await env.book.effective("vm-1")).level == 1
    # without an SLO, even a huge rate is left alone
    await env.book.set(PolicyScope.for_vm("vm-1"), EvictionPolicy(slo_promotion_rate=0.0))
    for k in range(60, 80):
        faults += 1000
        env.clock.set(T0 + 10 * k)
        await env.reg.heartbeat("n1", [status(faults, 10_000, T0 + 10 * k)])
        await env.sched.sync()
    assert (await env.book.effective("vm-1")).level == 1
    assert len([e for e in await env.reg.state.events_after(0) if e.kind is EventKind.POLICY_ADJUSTED]) == 1


def test_backoff_is_bounded() -> None:
    c = SloController(SloConfig(window_ms=60_000, max_level=2))
    for i in range(13):
        c.observe(status(1000 * i, 10_000, T0 + 10 * i), 0)
    assert c.evaluate("vm-1", SLO, 2, int((T0 + 120) * 1000)) is None  # at the max level already
    assert apply_adjustment(EvictionPolicy(cold_after=3), 0) == EvictionPolicy(cold_after=3)
