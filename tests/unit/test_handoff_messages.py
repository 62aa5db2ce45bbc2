"""Messages from the VMM on the handoff control channel are untrusted: each parses to a typed value, whatever its fields hold."""

from __future__ import annotations

import pytest

from tiermem.handoff.messages import Goodbye, Reply, UnknownMessage, VmmError, VmmMessage, parse_vmm_message

CASES: list[tuple[dict[str, object], VmmMessage]] = [
    ({"type": "ack", "id": 3}, Reply("ack", 3)),
    ({"type": "pong", "id": 0}, Reply("pong", 0)),
    ({"type": "nack", "id": 7, "error": "EINVAL", "errno": 22}, Reply("nack", 7, "EINVAL", 22)),
    ({"type": "nack", "id": 7}, Reply("nack", 7, "failed", 0)),  # no message, no errno
    ({"type": "nack", "id": 7, "errno": "22", "error": {"x": 1}}, Reply("nack", 7, "{'x': 1}", 0)),
    ({"type": "ack", "id": "3"}, Reply("ack", None)),  # a string id answers no request
    ({"type": "ack", "id": True}, Reply("ack", None)),  # nor does a boolean
    ({"type": "ack"}, Reply("ack", None)),
    ({"type": "nack", "id": 1, "errno": False}, Reply("nack", 1, "failed", 0)),
    ({"type": "bye"}, Goodbye()),
    ({"type": "detach", "extra": [1, 2]}, Goodbye()),
    ({"type": "error", "error": "disk on fire"}, VmmError("disk on fire")),
    ({"type": "error"}, VmmError("None")),
    ({"type": "zap", "id": 1}, UnknownMessage("'zap'")),  # a request type the agent never answers
    ({"type": 5}, UnknownMessage("5")),
    ({}, UnknownMessage("None")),
]


@pytest.mark.parametrize(("raw", "expected"), CASES, ids=[repr(c[0])[:60] for c in CASES])
def test_vmm_messages_parse_to_typed_values(raw: dict[str, object], expected: VmmMessage) -> None:
    assert parse_vmm_message(raw) == expected
