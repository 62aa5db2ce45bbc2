"""The gRPC layer: conversions, status mapping, server and channel construction.

Only this package and the two servicer modules (``tiermem.agent.service``,
``tiermem.control.service``) import the generated code in ``tiermem.v1``.
"""
