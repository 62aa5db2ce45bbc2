"""VMM side: handoff protocol, VMM client library, process guest, KVM VMM, workloads and traces."""
