"""Control-channel messages of the handoff protocol, typed where the agent reads or writes them.

After the handshake, the agent sends requests (``zap``, ``ping``) and notices
(``detach``, ``error``); the VMM answers requests (``ack``, ``nack``, ``pong``)
and may say ``bye``/``detach`` or report an ``error``. What the VMM sends is
untrusted: :func:`parse_vmm_message` turns a decoded JSON object into one of a
few frozen dataclasses, with every field checked for its type, so the agent
never indexes a raw dict. Spec: ``docs/handoff.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NotRequired, TypedDict

__all__ = [
    "AgentNotice",
    "AgentRequest",
    "AttachedNotice",
    "DetachNotice",
    "ErrorNotice",
    "Goodbye",
    "PingRequest",
    "Reply",
    "UnknownMessage",
    "VmmError",
    "VmmMessage",
    "ZapRequest",
    "parse_vmm_message",
]


# --- agent -> VMM ---------------------------------------------------------------------------------
class ZapRequest(TypedDict):
    """Zap (MADV_DONTNEED) these ``[start, length]`` ranges of guest memory, then ack."""

    type: Literal["zap"]
    id: int
    ranges: list[list[int]]


class PingRequest(TypedDict):
    """Answer with ``pong``."""

    type: Literal["ping"]
    id: int


class AttachedNotice(TypedDict):
    """The handshake succeeded: the agent serves this VM's faults from now on."""

    type: Literal["attached"]
    version: int
    vm_id: str
    incarnation: NotRequired[str]
    """The VM's incarnation (16 hex digits), issued at its first attach."""
    secret: NotRequired[str]
    """The reattach secret (64 hex digits): the VMM keeps it and sends it on every reattach."""


class DetachNotice(TypedDict):
    """The agent is done with this VM: unregister the guest memory and stop reconnecting."""

    type: Literal["detach"]


class ErrorNotice(TypedDict):
    """The agent closes the channel because of a protocol error."""

    type: Literal["error"]
    error: str
    code: str


AgentRequest = ZapRequest | PingRequest
AgentNotice = AttachedNotice | DetachNotice | ErrorNotice


# --- VMM -> agent (untrusted) ---------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    """``ack``, ``nack`` or ``pong`` to the agent's request ``request_id`` (None if the id is not an integer)."""

    kind: Literal["ack", "nack", "pong"]
    request_id: int | None
    error: str = ""
    """The VMM's message on a nack ("failed" when it gave none)."""
    errno: int = 0
    """The errno of a nack (0 when the VMM gave none, or not an integer)."""


@dataclass(frozen=True)
class Goodbye:
    """The VMM is going away (``bye``) or detaches (``detach``)."""


@dataclass(frozen=True)
class VmmError:
    """The VMM reports an error; the channel stays open."""

    error: str


@dataclass(frozen=True)
class UnknownMessage:
    """A message type this agent does not know (ignored, logged)."""

    type: str


VmmMessage = Reply | Goodbye | VmmError | UnknownMessage


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_vmm_message(msg: Mapping[str, object]) -> VmmMessage:
    """The typed form of one decoded message from the VMM; never raises on odd field values."""
    typ = msg.get("type")
    if typ == "ack" or typ == "nack" or typ == "pong":
        if typ != "nack":
            return Reply(typ, _int(msg.get("id")))
        return Reply(typ, _int(msg.get("id")), str(msg.get("error", "failed")), _int(msg.get("errno")) or 0)
    if typ in ("bye", "detach"):
        return Goodbye()
    if typ == "error":
        return VmmError(str(msg.get("error")))
    return UnknownMessage(repr(typ))
