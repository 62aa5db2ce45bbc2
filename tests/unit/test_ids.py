"""The one id grammar (issue 17 item 9): fullmatch, ASCII only, a length cap, no control characters."""

from __future__ import annotations

import pytest

from tiermem.errors import InvalidArgument
from tiermem.ids import ID_MAX, is_id, is_tenant, validate_id, validate_tenant
from tiermem.rpc.security import tenant_of_vm


@pytest.mark.parametrize("good", ["a", "acme.vm-1", "A_b.c-d", "9" * ID_MAX])
def test_valid_ids(good: str) -> None:
    assert validate_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "acme.vm1\n",
        "acme.vm1\r\n",
        "\nacme",
        "acme.vm\x00",
        "acme.vm\t",
        "acme vm",
        "-acme",
        ".acme",
        "9" * (ID_MAX + 1),
        "acme.vm\u0661",
        "acme.vm\uff11",
        "acmé",
        "acme/vm",
        None,
        7,
    ],
)
def test_invalid_ids(bad: object) -> None:
    assert not is_id(bad)
    with pytest.raises(InvalidArgument) as ei:
        validate_id(bad, "VM id")
    assert "\n" not in str(ei.value) and len(str(ei.value)) < 200  # the value is shown escaped and cut


def test_tenants_share_the_grammar() -> None:
    assert (
        is_tenant("acme") and not is_tenant("acme\n") and not is_tenant("ac.me") and not is_tenant("a" * 33)
    )
    with pytest.raises(InvalidArgument):
        validate_tenant("acme\n")
    assert tenant_of_vm("acme.vm1") == "acme"
    assert tenant_of_vm("acme.vm1\n") is None  # an invalid id belongs to no tenant
