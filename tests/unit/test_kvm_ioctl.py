"""KVM uapi layouts against the system headers, and the VMM's input checks (no /dev/kvm needed)."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tiermem.errors import FailedPrecondition, InvalidArgument
from tiermem.guests import kvm as kvm_mod
from tiermem.guests import kvm_ioctl as k
from tiermem.guests.kvm import KvmRunSummary, KvmVm

_PROBE_C = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/kvm.h>
#define P(name, expr) printf("%s %lu\n", name, (unsigned long)(expr))
int main(void) {
  P("KVM_GET_API_VERSION", KVM_GET_API_VERSION); P("KVM_CREATE_VM", KVM_CREATE_VM);
  P("KVM_CHECK_EXTENSION", KVM_CHECK_EXTENSION); P("KVM_GET_VCPU_MMAP_SIZE", KVM_GET_VCPU_MMAP_SIZE);
  P("KVM_GET_SUPPORTED_CPUID", KVM_GET_SUPPORTED_CPUID); P("KVM_CREATE_VCPU", KVM_CREATE_VCPU);
  P("KVM_SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION); P("KVM_SET_TSS_ADDR", KVM_SET_TSS_ADDR);
  P("KVM_RUN", KVM_RUN); P("KVM_GET_REGS", KVM_GET_REGS); P("KVM_SET_REGS", KVM_SET_REGS);
  P("KVM_GET_SREGS", KVM_GET_SREGS); P("KVM_SET_SREGS", KVM_SET_SREGS); P("KVM_SET_CPUID2", KVM_SET_CPUID2);
  P("KVM_CAP_USER_MEMORY", KVM_CAP_USER_MEMORY); P("KVM_CAP_MAX_VCPUS", KVM_CAP_MAX_VCPUS);
  P("KVM_EXIT_IO", KVM_EXIT_IO); P("KVM_EXIT_HLT", KVM_EXIT_HLT); P("KVM_EXIT_MMIO", KVM_EXIT_MMIO);
  P("KVM_EXIT_SHUTDOWN", KVM_EXIT_SHUTDOWN); P("KVM_EXIT_FAIL_ENTRY", KVM_EXIT_FAIL_ENTRY);
  P("KVM_EXIT_INTERNAL_ERROR", KVM_EXIT_INTERNAL_ERROR);
  P("sizeof_regs", sizeof(struct kvm_regs)); P("sizeof_sregs", sizeof(struct kvm_sregs));
  P("sizeof_segment", sizeof(struct kvm_segment)); P("sizeof_umr", sizeof(struct kvm_userspace_memory_region));
  P("sizeof_cpuid2", sizeof(struct kvm_cpuid2)); P("sizeof_cpuid_entry2", sizeof(struct kvm_cpuid_entry2));
  P("off_sregs_cr0", offsetof(struct kvm_sregs, cr0)); P("off_sregs_efer", offsetof(struct kvm_sregs, efer));
  P("off_sregs_gdt", offsetof(struct kvm_sregs, gdt));
  P("off_run_exit_reason", offsetof(struct kvm_run, exit_reason)); P("off_run_io", offsetof(struct kvm_run, io));
  return 0;
}
"""


@pytest.mark.skipif(
    shutil.which("gcc") is None or not Path("/usr/include/linux/kvm.h").exists(),
    reason="needs gcc and the kernel uapi headers",
)
def test_layouts_match_the_system_headers(tmp_path: Path) -> None:
    src = tmp_path / "probe.c"
    src.write_text(_PROBE_C)
    subprocess.run(["gcc", str(src), "-o", str(tmp_path / "probe")], check=True, capture_output=True)
    out = subprocess.run([str(tmp_path / "probe")], check=True, capture_output=True, text=True).stdout
    c = {name: int(v) for name, v in (line.split() for line in out.splitlines())}
    for name in (
        "KVM_GET_API_VERSION",
        "KVM_CREATE_VM",
        "KVM_CHECK_EXTENSION",
        "KVM_GET_VCPU_MMAP_SIZE",
        "KVM_GET_SUPPORTED_CPUID",
        "KVM_CREATE_VCPU",
        "KVM_SET_USER_MEMORY_REGION",
        "KVM_SET_TSS_ADDR",
        "KVM_RUN",
        "KVM_GET_REGS",
        "KVM_SET_REGS",
        "KVM_GET_SREGS",
        "KVM_SET_SREGS",
        "KVM_SET_CPUID2",
        "KVM_CAP_USER_MEMORY",
        "KVM_CAP_MAX_VCPUS",
        "KVM_EXIT_IO",
        "KVM_EXIT_HLT",
        "KVM_EXIT_MMIO",
        "KVM_EXIT_SHUTDOWN",
        "KVM_EXIT_FAIL_ENTRY",
        "KVM_EXIT_INTERNAL_ERROR",
    ):
        assert getattr(k, name) == c[name], name
    assert ctypes.sizeof(k.KvmRegs) == c["sizeof_regs"]
    assert ctypes.sizeof(k.KvmSregs) == c["sizeof_sregs"]
    assert ctypes.sizeof(k.KvmSegment) == c["sizeof_segment"]
    assert ctypes.sizeof(k.KvmUserspaceMemoryRegion) == c["sizeof_umr"]
    assert c["sizeof_cpuid2"] == k.KVM_CPUID2_HEADER
    assert c["sizeof_cpuid_entry2"] == k.KVM_CPUID_ENTRY2_SIZE
    assert k.KvmSregs.cr0.offset == c["off_sregs_cr0"]
    assert k.KvmSregs.efer.offset == c["off_sregs_efer"]
    assert k.KvmSregs.gdt.offset == c["off_sregs_gdt"]
    assert c["off_run_exit_reason"] == k.RUN_EXIT_REASON_OFF
    assert c["off_run_io"] == k.RUN_EXIT_UNION_OFF


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("bad id!", 1 << 20), "vm id"),
        (("vm", 0), "memory"),
        (("vm", 4097), "memory"),
        (("vm", 65 << 30), "memory"),
        (("vm", 1 << 20, 0), "vcpus"),
        (("vm", 1 << 20, 17), "vcpus"),
        (("vm", 1 << 20, 1, "nonsense:1"), "workload"),
        (("vm", 1 << 20, 1, "zipf"), "zipf"),
    ],
)
def test_bad_arguments_are_refused_before_any_kernel_call(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        KvmVm(*args)  # type: ignore[arg-type]


def test_without_kvm_start_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvm_mod, "kvm_unavailable_reason", lambda: "/dev/kvm: No such file or directory")
    vm = KvmVm("vm-nokvm", 1 << 20)
    with pytest.raises(FailedPrecondition) as exc:
        vm.start()
    msg = str(exc.value)
    assert "\n" not in msg and "/dev/kvm" in msg and "process guest" in msg and "--backend sim" in msg
    assert vm.ram is None  # nothing was created
    vm.close()


def test_unstarted_vm_refuses_to_run() -> None:
    vm = KvmVm("vm-idle", 1 << 20)
    with pytest.raises(FailedPrecondition, match="not started"):
        vm.run(1)
    with pytest.raises(FailedPrecondition, match="not started"):
        vm.verify()
    with pytest.raises(InvalidArgument):
        vm.run(0)


def test_summary_json_round_trip() -> None:
    s = KvmRunSummary(
        vm_id="a",
        memory_bytes=1 << 20,
        vcpus=2,
        workload="zipf:1.1",
        seed=3,
        agent_socket=None,
        mode="plain",
        duration_s=1.5,
        batches=10,
        accesses=100,
        reads=75,
        writes=25,
        accesses_per_s=66.7,
        faults=0,
        faults_per_s=0.0,
        resident_mib=0.5,
        zaps_served=0,
        pages_checked=256,
        mismatches=0,
        bad_pages=[],
    )
    assert json.loads(s.to_json()) == s.to_dict()
    assert json.loads(s.to_json())["mismatches"] == 0
