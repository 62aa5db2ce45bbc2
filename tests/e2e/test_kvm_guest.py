"""The reference KVM VMM on the real /dev/kvm, no agent: boot, batches, verification, several VMs."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from tiermem.errors import InvalidArgument
from tiermem.guests.kvm import KvmVm, Progress
from tiermem.guests.kvm_machine import GuestFault
from tiermem.sim import content

pytestmark = pytest.mark.kvm

MiB = 1 << 20


@pytest.fixture
def vm() -> Iterator[KvmVm]:
    v = KvmVm("kvm-a", 64 * MiB, vcpus=1, workload_spec="zipf:1.1", seed=7)
    v.start()
    yield v
    v.close()


def test_boot_run_batches_and_verify(vm: KvmVm) -> None:
    accesses = vm.run_batches(50)
    assert accesses == vm.accesses > 0
    s = vm.summary()
    assert s.reads + s.writes == accesses and s.writes > 0
    assert int(vm.expected.counts.sum()) == s.writes
    checked, bad = vm.verify()
    assert (checked, bad) == (vm.n_pages, 0)
    # What the guest reads is what the VMM expects: touch-read returns the counter.
    hot = int(np.argmax(vm.expected.counts))
    assert vm.touch([hot]) == int(vm.expected.counts[hot]) > 0


def test_guest_writes_follow_the_content_model(vm: KvmVm) -> None:
    pages = [0, 1, 5, 5, 5, vm.n_pages - 1]
    assert vm.touch(pages, write=True) == 0  # writes read nothing
    buf = np.empty(vm.n_pages * 4096, dtype=np.uint8)
    vm.machine.read_ram(0, buf)
    for p, n in ((0, 1), (1, 1), (5, 3), (vm.n_pages - 1, 1), (2, 0)):
        assert buf[p * 4096 : (p + 1) * 4096].tobytes() == content.page_bytes(p, n)
    # read-after-write inside one batch sees the new value: 3 + 4 + 4
    assert vm.touch(np.array([5, 5, 5, 5]), write=False) == 12
    assert vm.verify() == (vm.n_pages, 0)


def test_verification_catches_a_corrupted_page(vm: KvmVm) -> None:
    vm.touch([3, 4], write=True)
    # Corrupt page 4 behind the guest's back (through the memfd, as a buggy pager would).
    assert vm.ram is not None
    os.pwrite(vm.ram.memfd, (7).to_bytes(4, "little"), 4 * 4096)
    assert vm.verify()[1] == 1 and vm.summary().bad_pages == [4]


def test_timed_run_reports_progress_and_verifies() -> None:
    seen: list[Progress] = []
    with KvmVm("kvm-timed", 32 * MiB, vcpus=2, workload_spec="hotset:0.1:w=0.5", seed=1) as vm:
        vm.start()
        s = vm.run(2.5, seen.append, progress_interval_s=0.5)
    assert s.mismatches == 0 and s.pages_checked == 32 * MiB // 4096
    assert s.accesses > 0 and s.accesses_per_s > 0 and s.batches > 0
    assert len(seen) >= 3 and all(p.vm_id == "kvm-timed" for p in seen)
    assert [p.accesses for p in seen] == sorted(p.accesses for p in seen)
    # a 10% hot set of 32 MiB is all that becomes resident before the final verification
    assert 0 < seen[-1].resident_mib <= 32 * 0.1 + 0.1


def test_one_gib_guest_is_not_touched_at_start() -> None:
    with KvmVm("kvm-big", 1 << 30, vcpus=1, workload_spec="mix:0.5", seed=1) as vm:
        vm.start()
        assert vm.resident_bytes() == 0
        last = vm.n_pages - 1
        vm.touch([0, last // 2, last], write=True)
        vm.touch([last], write=True)
        assert vm.resident_bytes() == 3 * 4096
        assert vm.touch([last]) == 2 and vm.touch([0]) == 1


def test_vcpus_share_pages_without_losing_increments() -> None:
    # Four vCPUs hammer a 64-page hot set, all writes: lock inc keeps every increment.
    with KvmVm("kvm-smp", 16 * MiB, vcpus=4, workload_spec="hotset:0.015625:w=1.0", seed=3) as vm:
        vm.start()
        vm.run_batches(300)
        total = int(vm.expected.counts.sum())
        assert total == vm.accesses == 4 * 300 * 64
        assert vm.verify() == (vm.n_pages, 0)


def test_bad_page_index_is_refused(vm: KvmVm) -> None:
    with pytest.raises(InvalidArgument):
        vm.touch([vm.n_pages])
    with pytest.raises(InvalidArgument):
        vm.touch([-1])


def test_guest_access_outside_ram_is_reported_not_hidden(vm: KvmVm) -> None:
    # Bypass the VMM's range check: the guest touches the first page past its RAM slot.
    m = vm.machine
    bad = np.array([(m.n_pages << 1) | 1], dtype=np.uint32)
    with pytest.raises(GuestFault, match="MMIO"):
        m.run_batch(0, bad)


def test_two_guests_never_see_each_other() -> None:
    with (
        KvmVm("kvm-one", 16 * MiB, workload_spec="mix:0.5", seed=1) as a,
        KvmVm("kvm-two", 16 * MiB, workload_spec="mix:0.5", seed=2) as b,
    ):
        a.start()
        b.start()
        b.run_batches(20)
        snap_b = np.empty(16 * MiB, dtype=np.uint8)
        b.machine.read_ram(0, snap_b)
        a.run_batches(100)
        after_b = np.empty_like(snap_b)
        b.machine.read_ram(0, after_b)
        assert np.array_equal(snap_b, after_b)
        assert a.verify() == (a.n_pages, 0) and b.verify() == (b.n_pages, 0)
        assert not np.array_equal(a.expected.counts, b.expected.counts)


def test_guest_ram_above_4_gib_is_addressed_in_long_mode() -> None:
    with KvmVm("kvm-6g", 6 << 30, workload_spec="idle") as vm:
        vm.start()
        last, above_4g = vm.n_pages - 1, (4 << 30) // 4096 + 3
        vm.touch([last, last, above_4g, 0], write=True)
        assert (vm.touch([last]), vm.touch([above_4g]), vm.touch([0])) == (2, 1, 1)
        assert vm.resident_bytes() == 3 * 4096  # a sparse 6 GiB guest
        page = np.empty(4096, dtype=np.uint8)
        vm.machine.read_ram(above_4g * 4096, page)
        assert page.tobytes() == content.page_bytes(above_4g, 1)
