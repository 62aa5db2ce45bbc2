"""Glue between the VMM handoff socket and the agent: every valid handshake becomes a VM session."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import structlog

from tiermem.agent.node import Agent
from tiermem.errors import TiermemError
from tiermem.handoff.listener import HandoffAttach, HandoffListener
from tiermem.model import Backend

__all__ = ["on_handoff", "start_handoff"]

log = structlog.get_logger(__name__)


def on_handoff(agent: Agent, att: HandoffAttach) -> None:
    """Attach (or reattach) the VM a VMM just handed over; raising sends the VMM an error reply."""
    kind = Backend.RWP if att.mode == "rwp" else Backend.UFFD
    backend = att.make_backend(arm=True)
    try:
        session = agent.attach_backend(att.vm_id, kind, backend, tracking=att.tracking, secret=att.secret,
                                       fresh=att.fresh)  # fmt: skip
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
        try:
            on_handoff(agent, att)
        except TiermemError as e:
            log.warning("handoff refused", vm=att.vm_id, error=str(e))
            raise

    listener = HandoffListener(path, attach, handshake_timeout=agent.settings.handshake_timeout_s).start()
    return listener.stop
