"""Options shared by the commands: the control-plane connection, ``--json``, and unit-aware value types.

The connection options (``--server``, ``--token``, ``--tls-*``, ``--timeout``)
are accepted both before the command (``tiermem --server H:P vm list``) and
after it (``tiermem vm list --server H:P``); the later one wins. Unset options
leave ``ClientSettings`` to the environment (``TIERMEM_SERVER``,
``TIERMEM_TOKEN``, ``TIERMEM_TLS__CA_FILE``...) and its defaults.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from tiermem.cli.output import set_wide
from tiermem.config import ClientSettings, load_settings
from tiermem.errors import InvalidArgument
from tiermem.units import (
    parse_duration_ms,
    parse_eviction_cap,
    parse_memory,
    parse_rate_per_min,
    parse_size,
)

__all__ = [
    "CAP",
    "DURATION",
    "MEMORY",
    "RATE",
    "SIZE",
    "ClientFactory",
    "Parsed",
    "client_settings",
    "complete_node_ids",
    "complete_vm_ids",
    "connection_options",
    "get_client",
    "json_option",
]

if TYPE_CHECKING:
    from tiermem.rpc.clients import ControlPlaneClient

F = TypeVar("F", bound=Callable[..., Any])
ClientFactory = Callable[[ClientSettings], Any]
"""Builds the control-plane client from settings; tests inject a fake through ``obj['client_factory']``."""


class Parsed(click.ParamType):  # type: ignore[type-arg]  # generic only in click >= 8.2
    """A click type backed by one of the ``tiermem.units`` parsers (their message names the problem)."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """Parse ``value``; an InvalidArgument becomes click's BadParameter for this flag."""
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except InvalidArgument as e:
            self.fail(str(e), param, ctx)


DURATION = Parsed("duration", parse_duration_ms)
"""``30s``, ``500ms``, ``2m`` -> milliseconds."""
SIZE = Parsed("size", parse_size)
"""``512MiB``, ``1GiB`` -> bytes."""
MEMORY = Parsed("memory", parse_memory)
"""``256M``, ``1G``, ``1GiB`` (binary units) -> bytes."""
CAP = Parsed("cap", parse_eviction_cap)
"""``20%``, ``512MiB``, ``1000pages``, ``none`` -> EvictionCap."""
RATE = Parsed("rate", parse_rate_per_min)
"""``0.2%/min`` -> fraction per minute."""


def _obj(ctx: click.Context) -> dict[str, Any]:
    root = ctx.find_root()
    root.ensure_object(dict)
    obj: dict[str, Any] = root.obj
    return obj


def _store(key: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None:
            _obj(ctx).setdefault("conn", {})[key] = value

    return callback


def connection_options(f: F) -> F:
    """Add ``--server``, ``--token``, ``--tls-ca/--tls-cert/--tls-key``, ``--tls-server-name``, ``--timeout``."""
    opts = [
        click.option(
            "--server",
            metavar="HOST:PORT",
            expose_value=False,
            callback=_store("server"),
            help="Control plane address [env TIERMEM_SERVER; default 127.0.0.1:7000].",
        ),
        click.option(
            "--token",
            metavar="TOKEN",
            expose_value=False,
            callback=_store("token"),
            help="Bearer token [env TIERMEM_TOKEN, preferred: flags show in ps].",
        ),
        click.option(
            "--tls-ca",
            metavar="FILE",
            type=click.Path(dir_okay=False),
            expose_value=False,
            callback=_store("ca_file"),
            help="CA bundle that signs the server certificate (enables TLS).",
        ),
        click.option(
            "--tls-cert",
            metavar="FILE",
            type=click.Path(dir_okay=False),
            expose_value=False,
            callback=_store("cert_file"),
            help="Client certificate for mTLS.",
        ),
        click.option(
            "--tls-key",
            metavar="FILE",
            type=click.Path(dir_okay=False),
            expose_value=False,
            callback=_store("key_file"),
            help="Client private key for mTLS.",
        ),
        click.option(
            "--tls-server-name",
            metavar="NAME",
            expose_value=False,
            callback=_store("server_name"),
            help="Name to verify in the server certificate.",
        ),
        click.option(
            "--timeout",
            type=DURATION,
            metavar="DURATION",
            expose_value=False,
            callback=_store("timeout_ms"),
            help="Deadline per call, e.g. 10s [default 30s].",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def json_option(f: F) -> F:
    """Add ``--json`` and ``-o/--output table|wide|json`` (kubectl style); the command sees ``as_json``.

    ``-o json`` is ``--json``; ``-o wide`` prints tables at full width, never folding a cell.
    """

    @functools.wraps(f)
    def wrapper(*args: Any, output: str | None = None, **kwargs: Any) -> Any:
        if output == "json":
            kwargs["as_json"] = True
        elif output is not None and kwargs.get("as_json"):
            raise InvalidArgument(f"--json and -o {output} disagree; use one")
        set_wide(output == "wide")
        return f(*args, **kwargs)

    wrapper = click.option(
        "-o",
        "--output",
        type=click.Choice(["table", "wide", "json"]),
        default=None,
        help="Output format: table (default), wide (never fold cells) or json (= --json).",
    )(wrapper)
    return cast(
        F,
        click.option("--json", "as_json", is_flag=True, help="Print JSON (the documented fields).")(wrapper),
    )


def client_settings(ctx: click.Context) -> ClientSettings:
    """ClientSettings from the environment/TOML plus the connection flags given."""
    conn: dict[str, Any] = dict(_obj(ctx).get("conn", {}))
    tls = {k: conn.pop(k) for k in ("ca_file", "cert_file", "key_file", "server_name") if k in conn}
    timeout_ms = conn.pop("timeout_ms", None)
    if timeout_ms is not None:
        if timeout_ms <= 0:
            raise InvalidArgument("--timeout: must be > 0")
        conn["timeout_s"] = timeout_ms / 1000
    if tls:
        conn["tls"] = tls
    settings: ClientSettings = load_settings(ClientSettings, **conn)
    if bool(settings.tls.cert_file) != bool(settings.tls.key_file):
        raise InvalidArgument("--tls-cert and --tls-key go together (mTLS needs both)")
    return settings


def _default_factory(settings: ClientSettings) -> ControlPlaneClient:
    from tiermem.rpc.clients import ControlPlaneClient

    return ControlPlaneClient.from_settings(settings)


def get_client(ctx: click.Context) -> ControlPlaneClient:
    """The control-plane client for this invocation (built once, closed when the command ends)."""
    obj = _obj(ctx)
    if "client" not in obj:
        settings = client_settings(ctx)
        obj["server"] = settings.server
        factory: ClientFactory = obj.get("client_factory") or _default_factory
        client = factory(settings)
        obj["client"] = client
        close = getattr(client, "close", None)
        if callable(close):
            ctx.find_root().call_on_close(close)
    client_: ControlPlaneClient = obj["client"]
    return client_


def complete_vm_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of VM ids from the control plane (nothing if it cannot be reached quickly)."""
    try:
        _obj(ctx).setdefault("conn", {}).setdefault("timeout_ms", 2000)
        vms = get_client(ctx).list_vm_status()
    except Exception:  # completion must never print an error into the user's shell
        return []
    return sorted(s.vm_id for s in vms if s.vm_id.startswith(incomplete))


def complete_node_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of node ids from the control plane."""
    try:
        _obj(ctx).setdefault("conn", {}).setdefault("timeout_ms", 2000)
        nodes = get_client(ctx).list_nodes()
    except Exception:
        return []
    return sorted(n.node_id for n in nodes if n.node_id.startswith(incomplete))
