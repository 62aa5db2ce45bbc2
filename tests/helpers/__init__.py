"""Shared test helpers: real servers on loopback, free ports, capability probes."""
