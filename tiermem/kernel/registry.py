"""Backends whose guest memory the agent creates itself, by name, imported only when chosen.

Today there is one, ``sim``: the simulated kernel of :mod:`tiermem.sim`, which
is harness code and not part of the production agent. The agent names it here
as a string and imports it lazily, so ``import tiermem.agent`` loads no
simulation module. This is the one documented exception to the layer order
(see ``docs/architecture.md`` and ``tests/unit/test_architecture.py``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

from tiermem.errors import InvalidArgument
from tiermem.kernel.backend import KernelBackend

__all__ = ["LOCAL_BACKENDS", "LocalGuest", "LocalVmFactory", "local_vm_factory"]


class LocalGuest(Protocol):
    """An in-process guest that drives a local VM's memory (the sim's workload runner)."""

    vcpus: int

    def start(self) -> None:
        """Start the vCPU threads."""

    def stop(self) -> None:
        """Stop the vCPU threads (idempotent)."""

    def verify(self) -> tuple[int, int]:
        """(pages checked, pages whose contents differ from what the guest wrote)."""


LocalVmFactory = Callable[..., tuple[KernelBackend, LocalGuest | None]]
"""``factory(n_pages, *, synthetic, workload, vcpus, seed, trace_dir, trace_max_bytes)`` → (armed backend,
guest or None).

The guest is built but not started; an invalid workload raises InvalidArgument
and an allocation failure MemoryError, both before anything is armed.
"""

LOCAL_BACKENDS: dict[str, str] = {"sim": "tiermem.sim.vm:create_sim_vm"}
"""Backend name → ``module:function`` of its factory."""


def local_vm_factory(name: str) -> LocalVmFactory:
    """The factory of backend ``name``, importing its module now; InvalidArgument if unknown."""
    target = LOCAL_BACKENDS.get(name)
    if target is None:
        raise InvalidArgument(f"no local backend {name!r}: known {', '.join(sorted(LOCAL_BACKENDS))}")
    module, _, attr = target.partition(":")
    factory: LocalVmFactory = getattr(importlib.import_module(module), attr)
    return factory
