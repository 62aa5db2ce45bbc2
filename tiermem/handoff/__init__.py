"""The VMM handoff protocol, both ends: wire format, the agent's listener and connections, the VMM client library."""
