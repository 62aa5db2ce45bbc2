"""Guests that exercise the handoff protocol: the process guest and the reference KVM VMM with its guest assembler."""
