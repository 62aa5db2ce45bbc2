"""The control plane: registry, policies, scheduler, state stores and gRPC service."""
