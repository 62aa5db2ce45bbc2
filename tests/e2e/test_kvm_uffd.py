"""KVM guest RAM served through a real userfaultfd: MISSING faults after punching, MINOR after zapping.

The pager here is :class:`tiermem.guests.kvm_pager.PagerProcess`, a minimal handler in
a child process (not the agent): it evicts pages by saving and punching them, and
serves MISSING faults with UFFDIO_COPY and MINOR faults with UFFDIO_CONTINUE.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from tiermem.errors import TiermemError
from tiermem.guests.kvm import KvmVm
from tiermem.guests.kvm_pager import PagerProcess
from tiermem.kernel import uapi
from tiermem.kernel.uffd_ioctl import madvise

pytestmark = [pytest.mark.kvm, pytest.mark.uffd]

MiB = 1 << 20


@pytest.fixture
def paged_vm() -> Iterator[tuple[KvmVm, PagerProcess]]:
    vm = KvmVm("kvm-paged", 16 * MiB, vcpus=2, workload_spec="hotset:0.1:w=0.5:noise=0.2", seed=11)
    vm.start()
    assert vm.ram is not None
    pager = PagerProcess(vm.ram.base, vm.ram.size, vm.ram.memfd)
    yield vm, pager
    pager.close()
    vm.close()


def test_punched_pages_come_back_through_missing_faults(paged_vm: tuple[KvmVm, PagerProcess]) -> None:
    vm, pager = paged_vm
    vm.run_batches(20)
    first_touch = pager.stats()["missing"]
    assert first_touch > 0  # fresh guest RAM arrived as MISSING faults, served with zeros
    written = np.flatnonzero(vm.expected.counts)
    victims = written[:: max(1, len(written) // 200)][:200]
    pager.reset()
    assert pager.evict(victims) == len(victims)
    resident = vm.resident_bytes()
    # The guest reads every victim: each is exactly one MISSING fault, served with the saved bytes.
    got = vm.touch(victims)
    st = pager.stats()
    assert st["missing"] == len(victims) and st["minor"] == 0 and st["held"] == 0
    assert got == int(vm.expected.counts[victims].sum()) & 0xFFFF_FFFF
    assert vm.resident_bytes() == resident + len(victims) * 4096
    assert vm.verify() == (vm.n_pages, 0)


def test_zapped_pages_come_back_through_minor_faults(paged_vm: tuple[KvmVm, PagerProcess]) -> None:
    vm, pager = paged_vm
    vm.run_batches(10)
    touched = np.flatnonzero(vm.expected.counts)
    assert vm.ram is not None
    pager.reset()
    faults_before = vm.faults
    # Drop every PTE of the guest mapping in the VMM: the memfd keeps the data.
    madvise(vm.ram.base, vm.ram.size, uapi.MADV_DONTNEED)
    vm.touch(touched, write=True)
    st = pager.stats()
    assert st["minor"] == len(touched) and st["missing"] == 0
    # The VMM's own fault count (vCPU sleeps inside KVM_RUN) is an estimate: a fault resolved before
    # the thread is put to sleep goes uncounted, so it may be a little under the pager's exact count.
    slept = vm.faults - faults_before
    assert 0.95 * len(touched) <= slept <= len(touched) + 2
    assert vm.verify() == (vm.n_pages, 0)


def test_eviction_and_zapping_while_the_guest_keeps_running(paged_vm: tuple[KvmVm, PagerProcess]) -> None:
    vm, pager = paged_vm
    assert vm.ram is not None
    for _ in range(3):  # three "cycles": run, zap everything, run, evict the cold pages
        vm.run_batches(10)
        madvise(vm.ram.base, vm.ram.size, uapi.MADV_DONTNEED)
        vm.run_batches(5)
        hot = vm.workload.hot_pages()
        assert hot is not None
        cold = np.setdiff1d(np.flatnonzero(vm.expected.counts), hot)
        pager.evict(cold)
    assert pager.evict(cold) == 0  # evicting an evicted page again is a no-op, never a zero page
    st = pager.stats()
    assert st["minor"] > 0 and st["missing"] > 0
    assert vm.verify() == (vm.n_pages, 0)
    assert pager.stats()["held"] == 0  # verification faulted every evicted page back


def test_close_with_a_vcpu_stuck_on_an_unserved_fault_does_not_hang_or_crash() -> None:
    import os
    import signal
    import threading

    vm = KvmVm("kvm-stuck", 4 * MiB, workload_spec="mix:0.5", seed=1)
    vm.start()
    assert vm.ram is not None
    pager = PagerProcess(vm.ram.base, vm.ram.size, vm.ram.memfd)
    vm.touch([7], write=True)
    pager.evict([7])
    os.kill(pager._proc.pid, signal.SIGSTOP)  # the handler stops answering
    errors: list[BaseException] = []

    def guest() -> None:
        try:
            vm.touch([7])
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=guest, daemon=True)
    t.start()
    t.join(0.5)
    assert t.is_alive()  # the vCPU waits in the kernel for the fault
    vm.close(timeout=0.5)  # returns although the vCPU is still blocked
    os.kill(pager._proc.pid, signal.SIGCONT)
    pager.close()  # the uffd goes away: the fault fails (RAM is unmapped), KVM_RUN returns an error
    t.join(10)
    assert not t.is_alive()
    assert errors and isinstance(errors[0], TiermemError), errors  # reported to the caller, not a crash
