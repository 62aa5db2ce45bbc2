"""The node agent: per-VM sessions, cycle engine, fault server, page index and gRPC service."""
