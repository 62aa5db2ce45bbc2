"""A synchronous NodeAgent client for the calls operators make to one agent directly (snapshot import).

The control plane drives agents through :mod:`tiermem.control.agents`; this client is
for the CLI's ``--agent ADDR`` commands. gRPC failures come back as the tiermem error
tree, like every other client.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from tiermem.agent.snapshot import SnapshotInfo
from tiermem.config import TlsSettings
from tiermem.model import Compression
from tiermem.rpc import convert as c
from tiermem.rpc.channel import auth_metadata, sync_channel
from tiermem.rpc.status import error_from_rpc
from tiermem.v1 import agent_pb2 as apb
from tiermem.v1 import agent_pb2_grpc as agrpc

__all__ = ["AgentClient", "ImportProgress"]


@dataclass(frozen=True)
class ImportProgress:
    """One message of an import: pages read so far, and the result on the last one."""

    pages_done: int
    pages_total: int
    result: SnapshotInfo | None = None


class AgentClient:
    """NodeAgent calls on one agent."""

    def __init__(
        self, address: str, token: str = "", tls: TlsSettings | None = None, timeout_s: float = 30.0
    ) -> None:
        self.address = address
        self._channel = sync_channel(address, tls or TlsSettings())
        self._stub = agrpc.NodeAgentStub(self._channel)
        self._md = auth_metadata(token)
        self.timeout_s = timeout_s

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def import_snapshot(self, vm_id: str, *, mem_file: str = "", mem_object: str = "", store: str = "",
                        compression: Compression = Compression.NONE, prefault_pages_per_s: float | None = None,
                        timeout: float | None = None) -> Iterator[ImportProgress]:  # fmt: skip
        """ImportSnapshot: progress, then the result (no deadline by default: a big file takes its time)."""
        req = apb.ImportSnapshotRequest(
            vm_id=vm_id, mem_file=mem_file, mem_object=mem_object, store=store,
            compression=c.compression_to_pb(compression),  # type: ignore[arg-type]
            prefault_pages_per_second=prefault_pages_per_s or 0.0, has_prefault=prefault_pages_per_s is not None,
        )  # fmt: skip
        try:
            for m in self._stub.ImportSnapshot(req, timeout=timeout, metadata=self._md):
                info = None
                if m.done:
                    info = SnapshotInfo(
                        m.vm_id, m.pages, m.zero_pages, m.stored_bytes, m.store, m.source, m.socket
                    )
                yield ImportProgress(m.pages_done, m.pages_total, info)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
