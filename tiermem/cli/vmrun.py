"""``tiermem vm run``: a real KVM guest under the reference VMM, its memory handed to the agent."""

from __future__ import annotations

import signal
import threading

import click

from tiermem.cli.errors import EXIT_PRECONDITION, fail
from tiermem.cli.options import MEMORY
from tiermem.cli.output import console, emit_json
from tiermem.errors import TiermemError
from tiermem.units import parse_duration_ms

__all__ = ["run_vm"]


@click.command("run")
@click.option(
    "--memory", type=MEMORY, default="1GiB", show_default=True, metavar="SIZE", help="Guest RAM, e.g. 1G."
)
@click.option("--vcpus", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option(
    "--workload",
    default="zipf:1.1",
    show_default=True,
    metavar="SPEC",
    help="hotset:F, zipf:S, phases:F, scan, mix:W, idle, trace:PATH.",
)
@click.option("--duration", default="60s", show_default=True, help="How long the guest runs, e.g. 30s.")
@click.option(
    "--agent",
    "agent_socket",
    metavar="SOCKET",
    default=None,
    help="The agent's handoff socket; without it the guest runs untracked.",
)
@click.option("--vm-id", default=None, help="VM id [default: kvm-<pid>].")
@click.option(
    "--fresh",
    is_flag=True,
    help="Start a new incarnation even if an earlier VMM's evicted pages exist under this id (they are purged).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
def run_vm(
    memory: int,
    vcpus: int,
    workload: str,
    duration: str,
    agent_socket: str | None,
    vm_id: str | None,
    fresh: bool,
    seed: int,
    as_json: bool,
) -> None:
    """Boot a KVM guest that runs WORKLOAD for DURATION, then verify every page.

    Prints live progress (accesses/s, faults/s, resident MiB) and a final summary.
    Several can run on one host at once; each hands its memory to the agent at --agent.
    """
    import os

    from tiermem.guests.kvm import KvmVm, Progress

    try:
        seconds = parse_duration_ms(duration) / 1000
    except TiermemError as e:
        raise click.BadParameter(str(e), param_hint="--duration") from None
    vm_id = vm_id or f"kvm-{os.getpid()}"
    try:
        vm = KvmVm(vm_id, memory, vcpus=vcpus, workload_spec=workload, seed=seed)
    except TiermemError as e:
        fail(str(e))
    stop = threading.Event()
    old = signal.signal(signal.SIGINT, lambda *_: stop.set())

    def progress(p: Progress) -> None:
        if not as_json:
            console().print(
                f"{p.elapsed_s:6.1f}s  {p.accesses_per_s / 1e6:8.2f} M accesses/s  "
                f"{p.faults_per_s:8.0f} faults/s  {p.resident_mib:8.1f} MiB resident"
            )
        if stop.is_set():
            vm.stop()

    try:
        with vm:
            try:
                vm.start(agent_socket, fresh=fresh)
            except TiermemError as e:
                fail(str(e), EXIT_PRECONDITION)
            summary = vm.run(seconds, progress)
    finally:
        signal.signal(signal.SIGINT, old)
    if as_json:
        emit_json(summary.to_dict())
        return
    ok = "[green]0 mismatches[/]" if summary.mismatches == 0 else f"[red]{summary.mismatches} mismatches[/]"
    console().print(
        f"{summary.vm_id}: {summary.accesses} accesses in {summary.duration_s:.1f}s "
        f"({summary.accesses_per_s / 1e6:.2f} M/s), {summary.faults} faults, "
        f"{summary.pages_checked} pages verified, {ok}"
    )
    if summary.mismatches:
        raise SystemExit(EXIT_PRECONDITION)
