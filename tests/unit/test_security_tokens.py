"""Token specs and the tenant rule of tiermem.rpc.security."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiermem.errors import ConfigurationError
from tiermem.rpc.security import TokenAuthInterceptor, parse_tokens, tenant_allows, tenant_of_vm


def test_plain_token_is_valid_for_every_tenant() -> None:
    assert parse_tokens("s3cr3t") == {"s3cr3t": "*"}
    assert parse_tokens("") == {}
    assert parse_tokens("  ") == {}


def test_tenant_entries_and_separators() -> None:
    spec = "admin0123, acme:tok-a\nglobex:tok/g+=="
    assert parse_tokens(spec) == {"admin0123": "*", "tok-a": "acme", "tok/g+==": "globex"}
    assert parse_tokens("*:root-token") == {"root-token": "*"}


def test_token_file(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# operators\nadmin-token\n\nacme:acme-token  # the acme orchestrator\n")
    assert parse_tokens(f"@{f}") == {"admin-token": "*", "acme-token": "acme"}
    with pytest.raises(ConfigurationError, match="cannot read token file"):
        parse_tokens(f"@{tmp_path / 'missing'}")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("acme:", "empty or malformed"),
        ("bad.tenant:tok", "invalid tenant"),
        ("acme:tok,globex:tok", "two roles"),
        ("node:bad id:tok", "invalid node id"),
        ("role:x:tok", "malformed token spec entry"),
        ("acme:to ken", "malformed"),
    ],
)
def test_bad_specs_are_configuration_errors(spec: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        parse_tokens(spec)


def test_interceptor_needs_tokens() -> None:
    with pytest.raises(ConfigurationError):
        TokenAuthInterceptor("")
    assert TokenAuthInterceptor.from_spec("") is None
    assert TokenAuthInterceptor.from_spec("acme:t") is not None


def test_tenant_rule() -> None:
    assert tenant_of_vm("acme.vm-1") == "acme"
    assert tenant_of_vm("acme.") is None
    assert tenant_of_vm("vm-1") is None
    assert tenant_of_vm("a.b.c") == "a"
    assert tenant_allows("acme", "acme.vm-1")
    assert not tenant_allows("acme", "acmecorp.vm-1")  # prefix must end at the dot
    assert not tenant_allows("acme", "globex.vm-1")
    assert not tenant_allows("acme", "vm-1")
    assert tenant_allows("*", "vm-1")
    assert tenant_allows(None, "globex.vm-1")  # auth off


def test_node_role_entries() -> None:
    from tiermem.rpc.security import node_of

    tokens = parse_tokens("adm, acme:t1, node:n1:t2, node:*:t3")
    assert tokens == {"adm": "*", "t1": "acme", "t2": "node:n1", "t3": "node:*"}
    assert node_of("node:n1") == "n1" and node_of("node:*") == "*" and node_of("acme") is None
    assert not tenant_allows("node:n1", "acme.vm1")  # a node never acts on a VM
