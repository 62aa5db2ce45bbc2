"""The agent's seccomp profile (services/agent/seccomp.json), checked without a container engine.

Besides the format checks, the profile is compiled with the host's libseccomp the
way a container runtime does (rules filtered by the container's capabilities and
architecture) and installed in a child process, which then execs Python and does
what the agent does: creates a userfaultfd, a memfd, threads, and serves gRPC
health on loopback. A control run without ``userfaultfd`` in the profile shows
the filter is really applied.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "services" / "agent" / "seccomp.json"
# Docker's default capability set plus SYS_PTRACE, as in the compose "uffd" profile and the DaemonSet.
CAPS = {
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
    "CAP_SYS_PTRACE",
}
ACTIONS = {
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_LOG",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_NOTIFY",
}
OPS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}


def _profile() -> dict[str, Any]:
    return dict(json.loads(PROFILE.read_text()))


def test_profile_is_valid_docker_seccomp_json() -> None:
    p = _profile()
    assert p["defaultAction"] == "SCMP_ACT_ERRNO"  # an allow-list
    assert {a["architecture"] for a in p["archMap"]} >= {"SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"}
    allowed_keys = {"names", "action", "args", "includes", "excludes", "errnoRet", "comment"}
    for rule in p["syscalls"]:
        assert set(rule) <= allowed_keys, rule
        assert rule["action"] in ACTIONS
        assert rule["names"] and all(isinstance(n, str) and n for n in rule["names"])
        for arg in rule.get("args", []):
            assert set(arg) <= {"index", "value", "valueTwo", "op"} and arg["op"] in OPS
        for k in ("includes", "excludes"):
            assert set(rule.get(k, {})) <= {"caps", "arches", "minKernel"}


def test_profile_allows_userfaultfd_and_what_the_agent_needs() -> None:
    unconditional = {
        n
        for r in _profile()["syscalls"]
        if r["action"] == "SCMP_ACT_ALLOW" and not r.keys() & {"args", "includes", "excludes"}
        for n in r["names"]
    }
    assert {
        "userfaultfd",
        "memfd_create",
        "fallocate",
        "ioctl",
        "mmap",
        "madvise",
        "recvmsg",
        "sendmsg",
    } <= unconditional
    clone3 = [
        r for r in _profile()["syscalls"] if r["names"] == ["clone3"] and r["action"] == "SCMP_ACT_ERRNO"
    ]
    assert clone3 and clone3[0]["errnoRet"] == 38  # ENOSYS: glibc falls back to clone


# ---------------------------------------------------------------- compile with libseccomp, as runtimes do


def _libseccomp() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("seccomp")
    return ctypes.CDLL(name, use_errno=True) if name else None


def _arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _applies(rule: dict[str, Any], caps: set[str]) -> bool:
    inc, exc = rule.get("includes", {}), rule.get("excludes", {})
    if inc.get("caps") and not set(inc["caps"]) <= caps:
        return False
    if inc.get("arches") and _arch() not in inc["arches"]:
        return False
    if inc.get("minKernel"):
        have = tuple(int(x) for x in platform.release().split("-")[0].split(".")[:2])
        if have < tuple(int(x) for x in inc["minKernel"].split(".")[:2]):
            return False
    if exc.get("caps") and set(exc["caps"]) & caps:
        return False
    return not (exc.get("arches") and _arch() in exc["arches"])


def test_every_syscall_name_is_known_to_libseccomp() -> None:
    lib = _libseccomp()
    if lib is None:
        pytest.skip("libseccomp is not installed on this host")
    lib.seccomp_syscall_resolve_name_arch.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    arches = [0xC000003E, 0x40000003, 0xC00000B7, 0x40000028]  # x86_64, x86, aarch64, arm (AUDIT_ARCH_*)
    unknown = []
    for rule in _profile()["syscalls"]:
        for n in rule["names"]:
            if all(lib.seccomp_syscall_resolve_name_arch(a, n.encode()) < 0 for a in arches):
                unknown.append(n)
    assert not unknown, f"names no architecture knows: {unknown}"


CHILD = r"""
import ctypes, json, os, sys, threading, asyncio
libc = ctypes.CDLL(None, use_errno=True)
out = {}
fd = libc.syscall(323 if os.uname().machine == "x86_64" else 282, os.O_CLOEXEC | os.O_NONBLOCK)
out["userfaultfd"] = 0 if fd >= 0 else ctypes.get_errno()
if fd >= 0:
    os.close(fd)
out["unshare"] = 0 if libc.unshare(0x20000000) == 0 else ctypes.get_errno()   # CLONE_NEWUTS: SYS_ADMIN only
m = os.memfd_create("guest", os.MFD_CLOEXEC)
os.ftruncate(m, 1 << 20)
out["memfd"] = os.fstat(m).st_size
t = threading.Thread(target=lambda: out.__setitem__("thread", "ran"))
t.start(); t.join()

async def serve():
    sys.path.insert(0, sys.argv[1])
    from tiermem.rpc.server import ServerOptions, start_server
    from tiermem.rpc.channel import aio_channel
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    srv = await start_server(lambda s: None, [], ServerOptions(listen="127.0.0.1:0"))
    async with aio_channel(f"127.0.0.1:{srv.port}") as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    await srv.stop(0)
    return r.status
out["grpc_health"] = asyncio.run(serve())
print(json.dumps(out))
"""


def _run_under(profile: dict[str, Any]) -> dict[str, Any]:
    """Install ``profile`` (for CAPS) in a forked child, exec Python there and return what it saw."""
    lib = _libseccomp()
    assert lib is not None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: build and load the filter, then exec; report failures through the exit code
        try:
            os.close(r)
            os.dup2(w, 1)

            class Cmp(ctypes.Structure):
                _fields_ = [
                    ("arg", ctypes.c_uint),
                    ("op", ctypes.c_int),
                    ("a", ctypes.c_uint64),
                    ("b", ctypes.c_uint64),
                ]

            lib.seccomp_init.restype = ctypes.c_void_p
            lib.seccomp_rule_add_array.argtypes = [
                ctypes.c_void_p,
                ctypes.c_uint32,
                ctypes.c_int,
                ctypes.c_uint,
                ctypes.POINTER(Cmp),
            ]
            lib.seccomp_load.argtypes = [ctypes.c_void_p]
            errno_act = 0x00050000
            ctx = lib.seccomp_init(errno_act | profile.get("defaultErrnoRet", 1))
            for rule in profile["syscalls"]:
                if not _applies(rule, CAPS):
                    continue
                if rule["action"] == "SCMP_ACT_ALLOW":
                    act = 0x7FFF0000
                elif rule["action"] == "SCMP_ACT_ERRNO":
                    act = errno_act | rule.get("errnoRet", 1)
                else:
                    os._exit(90)
                args = rule.get("args", [])
                arr = (Cmp * max(1, len(args)))()
                for i, a in enumerate(args):
                    masked = a["op"] == "SCMP_CMP_MASKED_EQ"
                    # runc: for MASKED_EQ, value is the mask and valueTwo the expected value
                    arr[i] = Cmp(a["index"], OPS[a["op"]], a["value"], a.get("valueTwo", 0) if masked else 0)
                for n in rule["names"]:
                    nr = lib.seccomp_syscall_resolve_name(n.encode())
                    if nr < 0:
                        continue  # not a syscall of this architecture
                    rc = lib.seccomp_rule_add_array(ctx, act, nr, len(args), arr)
                    if rc < 0:
                        os._exit(91)
            if lib.seccomp_load(ctx) != 0:
                os._exit(92)
            os.execv(sys.executable, [sys.executable, "-c", CHILD, str(ROOT)])
        finally:
            os._exit(93)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, (
        f"child failed: {os.waitstatus_to_exitcode(status)} {out!r}"
    )
    return dict(json.loads(out))


@pytest.mark.uffd
def test_agent_syscalls_work_under_the_profile() -> None:
    if _libseccomp() is None:
        pytest.skip("libseccomp is not installed on this host")
    seen = _run_under(_profile())
    assert seen["userfaultfd"] == 0
    assert seen["unshare"] == 1  # EPERM: the filter is in force
    assert seen["memfd"] == 1 << 20
    assert seen["thread"] == "ran"  # clone3 -> ENOSYS -> clone fallback works
    assert seen["grpc_health"] == 1  # SERVING


@pytest.mark.uffd
def test_without_the_userfaultfd_rule_the_syscall_is_refused() -> None:
    """The control: the runtime default alone (no userfaultfd) makes the syscall fail with EPERM."""
    if _libseccomp() is None:
        pytest.skip("libseccomp is not installed on this host")
    p = _profile()
    p["syscalls"] = [r for r in p["syscalls"] if "userfaultfd" not in r["names"]]
    seen = _run_under(p)
    assert seen["userfaultfd"] == 1
    assert seen["grpc_health"] == 1


def test_subprocess_python_is_this_interpreter() -> None:
    # the child execs sys.executable; it must import tiermem from this checkout
    out = subprocess.run(
        [sys.executable, "-c", "import tiermem, sys; print(tiermem.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().startswith(str(ROOT))
