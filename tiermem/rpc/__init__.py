"""The gRPC layer: conversions, status mapping, server and channel construction, and both services' clients.

Only this package, the service edges (``tiermem.agent.service``/``server``,
``tiermem.control.service``/``server``) and the top layer (cli, demo, bench)
import grpc or the generated code in ``tiermem.v1``; ``tests/unit/test_architecture.py``
checks it. Both clients live here because a client is gRPC edge code that the
other side's process uses: ``clients`` (ControlPlane, used by the CLI and the
agent's control-plane link) and ``agent_client`` (NodeAgent, used by the control
plane); the domain packages ``agent`` and ``control`` stay free of gRPC.
"""
