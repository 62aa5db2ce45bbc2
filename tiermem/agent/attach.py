"""Glue between the VMM handoff socket and the agent: every valid handshake becomes a VM session."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NoReturn

import structlog

from tiermem.agent.node import Agent
from tiermem.errors import FailedPrecondition, TiermemError
from tiermem.handoff.listener import HandoffAttach, HandoffListener
from tiermem.model import Backend, EventKind

__all__ = ["NO_SNAPSHOT_SOURCE", "on_handoff", "refuse_firecracker", "start_handoff"]

log = structlog.get_logger(__name__)


NO_SNAPSHOT_SOURCE = (
    "no snapshot source for this Firecracker handshake: its memory would be served as zeros. Import the "
    "snapshot's memory file with `tiermem snapshot import VM --mem-file PATH` and give Firecracker the "
    "printed socket as the UFFD backend_path"
)


def refuse_firecracker(agent: Agent, att: HandoffAttach, socket_path: str, reason: str) -> NoReturn:
    """Refuse a Firecracker handshake loudly: event, error log, and FailedPrecondition.

    The listener turns the exception into an error line on the socket and closes the
    socket and the uffd. Firecracker's vCPUs then never get a page from us: a refused
    restore must fail, never resume the guest on zeroed memory.
    """
    agent.events.publish(
        EventKind.HANDOFF_REFUSED,
        f"Firecracker handshake from pid {att.peer_pid} refused: {reason}",
        "",
        pid=str(att.peer_pid),
        socket=socket_path,
    )
    log.error("firecracker handshake refused", pid=att.peer_pid, socket=socket_path, reason=reason)
    raise FailedPrecondition(reason)


def on_handoff(agent: Agent, att: HandoffAttach) -> None:
    """Attach (or reattach) the VM a VMM just handed over; raising sends the VMM an error reply."""
    kind = Backend.RWP if att.mode == "rwp" else Backend.UFFD
    backend = att.make_backend(arm=True)
    try:
        session = agent.attach_backend(
            att.vm_id, kind, backend, tracking=att.tracking, secret=att.secret, fresh=att.fresh
        )
    except BaseException:
        backend.close()
        raise
    vm_id = att.vm_id
    # the VMM keeps the secret to prove itself on reattach (after an agent restart, or a broken connection)
    att.incarnation, att.issued_secret = session.incarnation, session.reattach_secret

    def closed() -> None:
        # The VMM went away (or the connection broke): keep its evicted pages indexed; a
        # reattach on a new connection resumes serving them.
        if agent.sessions.get(vm_id) is not session:
            return
        if agent.index.count(vm_id) == 0:
            # Nothing of this VM lives outside its memory: the session simply ends.
            with contextlib.suppress(TiermemError):
                agent.detach(vm_id)
            return
        agent.mark_disconnected(vm_id)  # reports VMM_DISCONNECTED

    att.connection.on_close = closed
    log.info("vm handed off", vm=vm_id, mode=att.mode, pid=att.peer_pid, reattach=att.reattach)


def start_handoff(agent: Agent) -> Callable[[], None] | None:
    """Listen on the agent's handoff socket; returns a function that stops listening."""
    path = agent.settings.handoff_path()

    def attach(att: HandoffAttach) -> None:
        if att.mode == "firecracker":
            # Its handshake carries no VM id, so the shared socket cannot know which snapshot this
            # process restores: only a VM's own restore socket can serve it.
            refuse_firecracker(agent, att, path, NO_SNAPSHOT_SOURCE)
        try:
            on_handoff(agent, att)
        except TiermemError as e:
            log.warning("handoff refused", vm=att.vm_id, error=str(e))
            raise

    listener = HandoffListener(path, attach, handshake_timeout=agent.settings.handshake_timeout_s).start()
    return listener.stop
