"""Policies: validation, precedence, partial updates, versions, SLO adjustments."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tiermem.api import NodeInfo, PolicyScope, ScopeKind, VmSpec
from tiermem.control.clock import ManualClock
from tiermem.control.events import EventLog
from tiermem.control.policies import PolicyBook, apply_adjustment
from tiermem.control.registry import Registry
from tiermem.control.state_sqlite import SqliteState
from tiermem.errors import InvalidArgument, NotFound
from tiermem.model import EventKind, EvictionCap, EvictionPolicy
from tiermem.selector import normalize_selector, parse_selector

VM = PolicyScope.for_vm
SEL = PolicyScope.for_selector
FLEET = PolicyScope.fleet()


@pytest.fixture
async def book() -> AsyncIterator[PolicyBook]:
    clock = ManualClock()
    state = SqliteState("sqlite:///:memory:", clock=clock)
    await state.open()
    events = EventLog(state, clock)
    reg = Registry(state, events, clock)
    await reg.register_node(NodeInfo("n1", "127.0.0.1:7070"))
    await reg.add_vm(VmSpec("gold-db", "n1", 1 << 20, labels={"tier": "gold", "app": "db"}))
    await reg.add_vm(VmSpec("gold-web", "n1", 1 << 20, labels={"tier": "gold", "app": "web"}))
    await reg.add_vm(VmSpec("plain", "n1", 1 << 20))
    yield PolicyBook(state, events, clock, known_stores={"default", "s3"})
    await state.close()


async def test_precedence_vm_then_most_specific_selector_then_fleet_then_builtin(book: PolicyBook) -> None:
    eff = await book.effective("gold-db")
    assert eff.source is None and eff.policy.interval_ms == EvictionPolicy().interval_ms
    await book.set(FLEET, EvictionPolicy(interval_ms=60_000))
    assert (await book.effective("plain")).source == FLEET
    await book.set(SEL("tier=gold"), EvictionPolicy(interval_ms=20_000))
    await book.set(SEL("app=db,tier=gold"), EvictionPolicy(interval_ms=10_000))
    await book.set(SEL("app=db"), EvictionPolicy(interval_ms=15_000))  # newer, but less specific
    assert (await book.effective("gold-db")).policy.interval_ms == 10_000
    assert (await book.effective("gold-web")).policy.interval_ms == 20_000
    assert (await book.effective("plain")).policy.interval_ms == 60_000
    await book.set(VM("gold-db"), EvictionPolicy(interval_ms=5_000))
    eff = await book.effective("gold-db")
    assert eff.policy.interval_ms == 5_000 and eff.source == VM("gold-db") and not eff.adjusted


async def test_equally_specific_selectors_tie_to_the_newest(book: PolicyBook) -> None:
    await book.set(SEL("tier=gold"), EvictionPolicy(interval_ms=20_000))
    await book.set(SEL("app=web"), EvictionPolicy(interval_ms=25_000))
    assert (await book.effective("gold-web")).policy.interval_ms == 25_000
    await book.set(SEL("tier=gold"), EvictionPolicy(interval_ms=21_000))  # updated: now the newest
    assert (await book.effective("gold-web")).policy.interval_ms == 21_000


@pytest.mark.parametrize(
    "policy",
    [
        EvictionPolicy(interval_ms=0),
        EvictionPolicy(cold_after=0),
        EvictionPolicy(max_evict=EvictionCap(pages=-1)),
        EvictionPolicy(max_evict=EvictionCap(fraction=1.5)),
        EvictionPolicy(min_resident_bytes=-4096),
        EvictionPolicy(store="nfs"),
        EvictionPolicy(slo_promotion_rate=2.0),
    ],
)
async def test_invalid_policies_are_rejected_and_change_nothing(
    book: PolicyBook, policy: EvictionPolicy
) -> None:
    await book.set(FLEET, EvictionPolicy(interval_ms=60_000))
    before = (await book.list(), await book.state.events_after(0), await book.effective("plain"))
    with pytest.raises(InvalidArgument):
        await book.set(SEL("tier=gold"), policy)
    with pytest.raises(InvalidArgument):
        await book.set(FLEET, policy)
    assert (await book.list(), await book.state.events_after(0), await book.effective("plain")) == before


async def test_bad_scopes_and_fields(book: PolicyBook) -> None:
    with pytest.raises(NotFound):
        await book.set(VM("ghost"), EvictionPolicy())
    with pytest.raises(InvalidArgument):
        VM("bad id")
    with pytest.raises(InvalidArgument):
        SEL("tier")
    with pytest.raises(InvalidArgument):
        SEL("a=1,a=2")
    with pytest.raises(InvalidArgument):
        await book.set(FLEET, EvictionPolicy(), fields=["version"])
    with pytest.raises(InvalidArgument):
        await book.set(FLEET, EvictionPolicy(), fields=["colder"])
    with pytest.raises(NotFound):
        await book.delete(SEL("tier=silver"))
    with pytest.raises(NotFound):
        await book.effective("ghost")
    assert await book.list() == []


async def test_partial_updates_keep_other_fields(book: PolicyBook) -> None:
    await book.set(SEL("tier=gold"), EvictionPolicy(interval_ms=20_000, cold_after=4, store="s3"))
    # a new VM entry starts from what applied to the VM until now
    e = await book.set(VM("gold-db"), EvictionPolicy(cold_after=9), fields=["cold_after"])
    assert (e.policy.interval_ms, e.policy.cold_after, e.policy.store) == (20_000, 9, "s3")
    # an existing entry keeps its unnamed fields
    e = await book.set(VM("gold-db"), EvictionPolicy(paused=True, prefetch_pages=0), fields=["paused"])
    assert (e.policy.cold_after, e.policy.paused, e.policy.prefetch_pages) == (9, True, 8)
    # no fields: the whole policy is replaced
    e = await book.set(VM("gold-db"), EvictionPolicy(interval_ms=7_000))
    assert (e.policy.interval_ms, e.policy.cold_after, e.policy.paused, e.policy.store) == (
        7_000,
        3,
        False,
        "default",
    )
    # a partial update that would make the policy invalid changes nothing
    with pytest.raises(InvalidArgument):
        await book.set(VM("gold-db"), EvictionPolicy(cold_after=0), fields=["cold_after"])
    assert (await book.effective("gold-db")).policy.interval_ms == 7_000


async def test_versions_only_grow_even_across_deletions(book: PolicyBook) -> None:
    seen = []
    e1 = await book.set(FLEET, EvictionPolicy(interval_ms=60_000))
    seen.append((await book.effective("gold-db")).policy.version)
    e2 = await book.set(VM("gold-db"), EvictionPolicy(interval_ms=5_000))
    seen.append((await book.effective("gold-db")).policy.version)
    assert e2.policy.version > e1.policy.version
    await book.delete(VM("gold-db"))  # the older fleet entry applies again ...
    eff = await book.effective("gold-db")
    assert eff.policy.interval_ms == 60_000 and eff.source == FLEET
    seen.append(eff.policy.version)  # ... with a version newer than the deleted one
    await book.adjust("gold-db", 1, "test back-off")
    seen.append((await book.effective("gold-db")).policy.version)
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    kinds = [ev.kind for ev in await book.state.events_after(0) if ev.kind is not EventKind.NODE_UP]
    assert kinds == [EventKind.POLICY_CHANGED] * 3 + [EventKind.POLICY_ADJUSTED]


async def test_adjustment_backs_off_but_never_past_the_operator_policy(book: PolicyBook) -> None:
    base = EvictionPolicy(cold_after=3, max_evict=EvictionCap(pages=1000))
    await book.set(VM("gold-db"), base)
    await book.adjust("gold-db", 2, "rate above SLO")
    eff = await book.effective("gold-db")
    assert eff.adjusted and eff.level == 2
    assert (eff.policy.cold_after, eff.policy.max_evict.pages) == (12, 250)
    ev = (await book.state.events_after(0))[-1]
    assert (
        ev.kind is EventKind.POLICY_ADJUSTED
        and ev.message == "rate above SLO"
        and ev.attributes["level"] == "2"
    )
    await book.adjust("gold-db", -3, "tighten")  # clamped at 0: the operator's policy exactly
    eff = await book.effective("gold-db")
    assert not eff.adjusted and (eff.policy.cold_after, eff.policy.max_evict.pages) == (3, 1000)
    assert apply_adjustment(EvictionPolicy(cold_after=200), 3).cold_after == EvictionPolicy.MAX_COLD_AFTER
    assert apply_adjustment(EvictionPolicy(max_evict=EvictionCap(fraction=0.5)), 1).max_evict.fraction == 0.25


async def test_list_filters_by_selector(book: PolicyBook) -> None:
    await book.set(FLEET, EvictionPolicy())
    await book.set(SEL("tier=gold"), EvictionPolicy())
    await book.set(SEL("app=db,tier=gold"), EvictionPolicy())
    await book.set(VM("gold-web"), EvictionPolicy())
    await book.set(VM("plain"), EvictionPolicy())
    keys = [e.scope.key for e in await book.list("tier=gold")]
    assert sorted(keys) == ["selector:app=db,tier=gold", "selector:tier=gold", "vm:gold-web"]
    assert len(await book.list()) == 5
    assert [e.scope.kind for e in await book.list("app=db")] == [ScopeKind.SELECTOR]


def test_selector_parsing() -> None:
    assert parse_selector(" tier=gold , app=db ") == {"tier": "gold", "app": "db"}
    assert normalize_selector("b=2,a=1") == "a=1,b=2"
    assert parse_selector("env=") == {"env": ""}
    for bad in ["", ",", "=x", "a=b=c", "a b=c", "a=1,a=2"]:
        with pytest.raises(InvalidArgument):
            parse_selector(bad)
