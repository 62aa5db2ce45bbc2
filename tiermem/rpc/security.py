"""Authentication for every gRPC server and client: TLS/mTLS credentials, bearer tokens, tenants.

TLS is enforced by the transport (:func:`server_credentials`, :func:`channel_credentials`).
Bearer tokens and tenant scoping are enforced by ONE server interceptor,
:class:`TokenAuthInterceptor`:

* no token, or an unknown one -> ``UNAUTHENTICATED``;
* a token valid for another tenant -> ``PERMISSION_DENIED``;
* the gRPC health service stays open so probes work without a token.

Roles (docs/threat-model.md has the least-privilege table), one per token:

* ``*`` (admin: operators, the control plane calling agents): every method, every tenant;
* a tenant ``T``: methods on VMs whose id starts with ``T.`` (``acme.vm-17`` belongs
  to ``acme``). Tenant names never contain a dot. Labels are NOT used for
  authorisation: callers choose them. A tenant token may call a method only if
  every ``vm_id`` in the request (top level or in a nested message such as
  ``RegisterVmRequest.vm`` or ``PolicyScope``) belongs to its tenant. A request
  that names no VM is allowed only for read methods (``Get*``, ``List*``,
  ``Stream*``). Reads are filtered by default-deny: a repeated entry or a streamed
  message is shown only if it names at least one VM and every VM it names is the
  tenant's (so node lists, selector and fleet policies, and node events without a
  ``vm_id`` are hidden), and node-wide sub-messages (``NodeInfo``, ``NodeStats``)
  are cleared. Node and fleet methods need ``*``;
* a node ``node:N`` (an agent calling the control plane): only ``RegisterNode``,
  ``Heartbeat`` and ``ReportCycles``, and only with ``node_id`` ``N`` (``node:*``:
  any one node id, for a DaemonSet sharing one Secret). It can never act on a VM,
  a policy or another role's method; the control plane keeps a heartbeat's or
  report's VM data only for VMs registered on that node.

A caller may send ``x-tiermem-tenant: T`` to act as ``T``; a ``*`` token then
narrows to ``T``, a token of another tenant or a node token is refused.

Servicers that need an explicit check (e.g. a VM found by another key) call
:func:`require_tenant` or :func:`tenant_allows` with :func:`caller_tenant`;
:func:`is_tenant_caller` tells whether the caller is scoped to one tenant (the
demo facilities and manual-cycle limits depend on it).

Token specs (``token`` settings): comma- or newline-separated entries, each
``TOKEN`` (admin, every tenant), ``TENANT:TOKEN`` or ``node:NODE_ID:TOKEN``
(``node:*:TOKEN`` for any one node), ``#`` starting a comment;
a spec starting with ``@`` names a file holding such entries, which is how
Kubernetes Secrets mounted as files are used. Tokens never contain spaces, commas,
colons or ``#`` (use ``openssl rand -hex 32``).
"""

from __future__ import annotations

import contextvars
import hmac
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from tiermem.config import TlsSettings
from tiermem.errors import ConfigurationError
from tiermem.ids import is_id, is_tenant

__all__ = [
    "ALL_TENANTS",
    "NODE_METHODS",
    "OPEN_METHODS",
    "REFLECTION_METHODS",
    "TENANT_HEADER",
    "TokenAuthInterceptor",
    "caller_tenant",
    "channel_credentials",
    "is_tenant_caller",
    "node_of",
    "parse_tokens",
    "require_tenant",
    "server_credentials",
    "tenant_allows",
    "tenant_of_vm",
]

OPEN_METHODS = ("/grpc.health.v1.Health/",)
REFLECTION_METHODS = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
"""Reflection: open only with ``reflection_without_token`` (it reveals the public schema, nothing else)."""
"""Method prefixes served without a token (probes must work without secrets)."""
ALL_TENANTS = "*"
TENANT_HEADER = "x-tiermem-tenant"
READ_PREFIXES = ("Get", "List", "Stream")
NODE_ROLE = "node"
NODE_METHODS = frozenset(
    f"/tiermem.v1.ControlPlane/{m}" for m in ("RegisterNode", "Heartbeat", "ReportCycles")
)
"""The only methods a node credential may call (always as its own node)."""
_FLEET_TYPES = frozenset({"tiermem.v1.NodeInfo", "tiermem.v1.NodeStats"})
"""Node-wide messages: never shown to a tenant, wherever they appear in a response."""
_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("tiermem_caller_tenant", default=None)
_MAX_DEPTH = 3


# ---------------------------------------------------------------- TLS


def _read_pem(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigurationError(f"cannot read {what} {path!r}: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ConfigurationError(f"{what} {path!r} is not a PEM file")
    return data


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """Server credentials for ``tls``, or None for plaintext.

    Any TLS field without ``cert_file`` is an error rather than a silent
    plaintext server.
    """
    if not tls.cert_file:
        if tls.key_file or tls.ca_file or tls.require_client_cert:
            raise ConfigurationError("server TLS needs tls.cert_file and tls.key_file")
        return None
    if not tls.key_file:
        raise ConfigurationError("tls.key_file is required with tls.cert_file")
    ca = _read_pem(tls.ca_file, "tls.ca_file") if tls.ca_file else None
    if tls.require_client_cert and ca is None:
        raise ConfigurationError("tls.require_client_cert needs tls.ca_file to verify clients")
    return grpc.ssl_server_credentials(
        [(_read_pem(tls.key_file, "tls.key_file"), _read_pem(tls.cert_file, "tls.cert_file"))],
        root_certificates=ca,
        require_client_auth=tls.require_client_cert,
    )


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials | None:
    """Client credentials for ``tls``, or None for plaintext.

    ``ca_file`` verifies the server (empty: the system roots); ``cert_file`` and
    ``key_file`` together present a client certificate (mTLS).
    """
    if not tls.enabled:
        if tls.key_file:
            raise ConfigurationError("tls.key_file given without tls.cert_file")
        return None
    if bool(tls.cert_file) != bool(tls.key_file):
        raise ConfigurationError("client TLS needs both tls.cert_file and tls.key_file, or neither")
    ca = _read_pem(tls.ca_file, "tls.ca_file") if tls.ca_file else None
    key = _read_pem(tls.key_file, "tls.key_file") if tls.key_file else None
    cert = _read_pem(tls.cert_file, "tls.cert_file") if tls.cert_file else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


# ---------------------------------------------------------------- tokens and tenants


def parse_tokens(spec: str) -> dict[str, str]:
    """Token -> tenant from a token spec (see the module docstring). Empty spec: no tokens."""
    spec = spec.strip()
    if spec.startswith("@"):
        path = spec[1:]
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigurationError(f"cannot read token file {path!r}: {e.strerror}") from None
    else:
        text = spec
    # "#" starts a comment to the end of the line, in files and inline specs alike
    lines = [ln.split("#", 1)[0] for ln in text.splitlines()]
    entries = [e.strip() for ln in lines for e in ln.split(",")]
    tokens: dict[str, str] = {}
    for entry in filter(None, entries):
        principal, token = _principal(entry)
        if not token or any(c.isspace() for c in token):
            raise ConfigurationError(f"empty or malformed token for {principal!r}")
        if tokens.get(token, principal) != principal:
            raise ConfigurationError(f"one token is given for two roles ({tokens[token]!r}, {principal!r})")
        tokens[token] = principal
    return tokens


def _principal(entry: str) -> tuple[str, str]:
    """(principal, token) of one spec entry: ``TOKEN``, ``TENANT:TOKEN`` or ``node:NODE_ID:TOKEN``."""
    parts = [p.strip() for p in entry.split(":")]
    if len(parts) == 1:
        return ALL_TENANTS, parts[0]
    if len(parts) == 2:
        if parts[0] != ALL_TENANTS and not is_tenant(parts[0]):
            raise ConfigurationError(f"invalid tenant name {parts[0]!r} in token spec")
        return parts[0], parts[1]
    if len(parts) == 3 and parts[0] == NODE_ROLE:
        if parts[1] != ALL_TENANTS and not is_id(parts[1]):
            raise ConfigurationError(f"invalid node id {parts[1]!r} in token spec")
        return f"{NODE_ROLE}:{parts[1]}", parts[2]
    raise ConfigurationError("malformed token spec entry: use TOKEN, TENANT:TOKEN or node:NODE_ID:TOKEN")


def node_of(principal: str | None) -> str | None:
    """The node id of a node principal (``*`` for any node), or None for other roles."""
    if principal is None or not principal.startswith(NODE_ROLE + ":"):
        return None
    return principal[len(NODE_ROLE) + 1 :]


def tenant_of_vm(vm_id: str) -> str | None:
    """The tenant a VM id belongs to (the part before the first dot), or None."""
    tenant, sep, rest = vm_id.partition(".")
    return tenant if sep and rest and is_id(vm_id) and is_tenant(tenant) else None


def tenant_allows(tenant: str | None, vm_id: str) -> bool:
    """True if a caller scoped to ``tenant`` may act on ``vm_id`` (None: auth is off; nodes: never)."""
    if tenant is None or tenant == ALL_TENANTS:
        return True
    if node_of(tenant) is not None:
        return False
    return tenant_of_vm(vm_id) == tenant


def caller_tenant() -> str | None:
    """The current RPC's caller: a tenant name, ``*``, ``node:ID``, or None when token auth is off."""
    return _CALLER.get()


def is_tenant_caller() -> bool:
    """True if the current RPC's caller is scoped to one tenant (not an admin, not auth off)."""
    who = _CALLER.get()
    return who is not None and who != ALL_TENANTS and node_of(who) is None


async def require_tenant(context: grpc.aio.ServicerContext[Any, Any], vm_id: str) -> None:
    """Abort the current RPC with PERMISSION_DENIED unless the caller may act on ``vm_id``."""
    tenant = caller_tenant()
    if not tenant_allows(tenant, vm_id):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, _foreign(vm_id, tenant))


def _foreign(vm_id: str, tenant: str | None) -> str:
    return f"VM {vm_id!r} does not belong to tenant {tenant!r} (VM ids of a tenant start with '{tenant}.')"


def _vm_ids(msg: Any, depth: int = 0) -> list[str]:
    """Every ``vm_id`` in ``msg`` and its singular sub-messages (not repeated fields or maps)."""
    if not isinstance(msg, Message) or depth > _MAX_DEPTH:
        return []
    ids: list[str] = []
    for fd, value in msg.ListFields():
        if fd.name == "vm_id" and isinstance(value, str) and value:
            ids.append(value)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and not _is_repeated(fd):
            ids.extend(_vm_ids(value, depth + 1))
    return ids


def _is_repeated(fd: FieldDescriptor) -> bool:
    return bool(fd.is_repeated)


def _visible(msg: Any, tenant: str) -> bool:
    """Default-deny: shown to a tenant only if it names a VM and every VM it names is the tenant's."""
    if isinstance(msg, Message) and msg.DESCRIPTOR.full_name in _FLEET_TYPES:
        return False
    ids = _vm_ids(msg)
    return bool(ids) and all(tenant_allows(tenant, v) for v in ids)


def _filter(msg: Any, tenant: str) -> Any:
    """Drop repeated entries of ``msg`` not visible to ``tenant`` and clear node-wide parts (in place)."""
    if tenant == ALL_TENANTS or not isinstance(msg, Message):
        return msg
    for fd, value in msg.ListFields():
        if fd.type != FieldDescriptor.TYPE_MESSAGE or fd.message_type is None:
            continue
        if not _is_repeated(fd):
            if fd.message_type.full_name in _FLEET_TYPES:
                msg.ClearField(fd.name)
            continue
        if fd.message_type.GetOptions().map_entry:
            continue
        keep = [e for e in value if _visible(e, tenant)]
        if len(keep) != len(value):
            copies = []
            for e in keep:
                c = type(e)()
                c.CopyFrom(e)
                copies.append(c)
            del value[:]
            value.extend(copies)
    return msg


def _method_name(full: str) -> str:
    return full.rsplit("/", 1)[-1]


# ---------------------------------------------------------------- interceptor

if TYPE_CHECKING:
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]]


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` on every call but health checks, and scope tenants.

    ``tokens`` is a mapping token -> tenant (``*`` is every tenant) or a token
    spec string (see :func:`parse_tokens`).
    """

    def __init__(self, tokens: Mapping[str, str] | str, open_reflection: bool = False) -> None:
        self._open = OPEN_METHODS + (REFLECTION_METHODS if open_reflection else ())
        self._tokens = parse_tokens(tokens) if isinstance(tokens, str) else dict(tokens)
        if not self._tokens:
            raise ConfigurationError("token auth needs at least one token")
        for who in self._tokens.values():
            node = node_of(who)
            if node is not None:
                if node != ALL_TENANTS and not is_id(node):
                    raise ConfigurationError(f"invalid node id {node!r}")
            elif who != ALL_TENANTS and not is_tenant(who):
                raise ConfigurationError(f"invalid tenant name {who!r}")

    @classmethod
    def from_spec(cls, spec: str, open_reflection: bool = False) -> TokenAuthInterceptor | None:
        """An interceptor for a token spec, or None when the spec is empty (auth off)."""
        tokens = parse_tokens(spec)
        return cls(tokens, open_reflection) if tokens else None

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> _Handler | None:
        method = handler_call_details.method
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        md = {k.lower(): v for k, v in (handler_call_details.invocation_metadata or ())}
        header = md.get("authorization", "")
        token = header[7:].strip() if isinstance(header, str) and header[:7].lower() == "bearer " else ""
        tenant = self._match(token)
        if tenant is None:
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        if handler is None:
            return None  # unknown method: UNIMPLEMENTED, now that the caller is known
        want = md.get(TENANT_HEADER, "")
        node = node_of(tenant)
        if node is not None:
            if want:
                return _deny(
                    handler, grpc.StatusCode.PERMISSION_DENIED, "a node token cannot act as a tenant"
                )
            if method not in NODE_METHODS:
                return _deny(
                    handler,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{_method_name(method)} is not allowed to a node token: it may only register, "
                    "heartbeat and report cycles as its own node",
                )
            return _node_scoped(handler, tenant, node)
        if isinstance(want, str) and want:
            if tenant != ALL_TENANTS and want != tenant:
                return _deny(
                    handler, grpc.StatusCode.PERMISSION_DENIED, f"token is not valid for tenant {want!r}"
                )
            if want != ALL_TENANTS and not is_tenant(want):
                return _deny(handler, grpc.StatusCode.PERMISSION_DENIED, f"invalid tenant {want!r}")
            tenant = want
        return _scoped(handler, tenant, method)

    def _match(self, token: str) -> str | None:
        if not token:
            return None
        found: str | None = None
        for known, tenant in self._tokens.items():
            # constant-time comparison, and no early exit: no timing oracle on tokens
            if hmac.compare_digest(known.encode(), token.encode()):
                found = tenant
        return found


def _deny(handler: _Handler | None, code: grpc.StatusCode, message: str) -> _Handler:
    """A handler of the same kind as ``handler`` that aborts with ``code``.

    The kind must match: a unary-unary handler answering a server-streaming call
    makes the client see a protocol error instead of ``code``.
    """

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield None  # pragma: no cover - unreachable; makes this an async generator

    req_stream = bool(handler and handler.request_streaming)
    resp_stream = bool(handler and handler.response_streaming)
    # No deserializers: a rejected caller's payload is never parsed.
    if req_stream and resp_stream:
        return grpc.stream_stream_rpc_method_handler(stream)
    if req_stream:
        return grpc.stream_unary_rpc_method_handler(unary)
    if resp_stream:
        return grpc.unary_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


async def _check_request(
    request: Any, context: grpc.aio.ServicerContext[Any, Any], tenant: str, method: str
) -> None:
    if tenant == ALL_TENANTS:
        return
    ids = _vm_ids(request)
    for vm_id in ids:
        if not tenant_allows(tenant, vm_id):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, _foreign(vm_id, tenant))
    if not ids and not _method_name(method).startswith(READ_PREFIXES):
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{_method_name(method)} names no VM of tenant {tenant!r}: it needs a token valid for all tenants",
        )


def _node_ids(msg: Any, depth: int = 0) -> list[str]:
    """Every ``node_id`` in ``msg`` and its singular sub-messages (as :func:`_vm_ids`)."""
    if not isinstance(msg, Message) or depth > _MAX_DEPTH:
        return []
    ids: list[str] = []
    for fd, value in msg.ListFields():
        if fd.name == "node_id" and isinstance(value, str):
            ids.append(value)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and not _is_repeated(fd):
            ids.extend(_node_ids(value, depth + 1))
    return ids


def _node_scoped(handler: _Handler, principal: str, node: str) -> _Handler:
    """Wrap a node method for a node token: the request must name this node, and only it."""
    des, ser = handler.request_deserializer, handler.response_serializer
    inner: Any = handler.unary_unary
    if handler.request_streaming or handler.response_streaming or inner is None:
        return _deny(handler, grpc.StatusCode.PERMISSION_DENIED, "not a node method")

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        _CALLER.set(principal)
        ids = set(_node_ids(request))
        if len(ids) != 1 or (node != ALL_TENANTS and ids != {node}):
            shown = ", ".join(sorted(repr(i) for i in ids)) or "none"
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this node token acts only as node {node!r}; the request names {shown}",
            )
        result = inner(request, context)
        return await result if inspect.isawaitable(result) else result

    return grpc.unary_unary_rpc_method_handler(unary_unary, des, ser)


def _scoped(handler: _Handler, tenant: str, method: str) -> _Handler:
    """Wrap ``handler``: bind the caller's tenant, check the request, filter responses."""
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming:
        if tenant != ALL_TENANTS:
            return _deny(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                "client-streaming methods need a token valid for all tenants",
            )
        return _bind_only(handler, tenant)
    if handler.response_streaming:
        inner_s: Any = handler.unary_stream

        async def unary_stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            _CALLER.set(tenant)
            await _check_request(request, context, tenant, method)
            result = inner_s(request, context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    if tenant == ALL_TENANTS or _visible(item, tenant):
                        yield _filter(item, tenant)
            elif inspect.isawaitable(result):
                await result  # the servicer writes with context.write()
            elif result is not None:
                for item in result:
                    if tenant == ALL_TENANTS or _visible(item, tenant):
                        yield _filter(item, tenant)

        return grpc.unary_stream_rpc_method_handler(unary_stream, des, ser)
    inner_u: Any = handler.unary_unary

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        _CALLER.set(tenant)
        await _check_request(request, context, tenant, method)
        result = inner_u(request, context)
        if inspect.isawaitable(result):
            result = await result
        return _filter(result, tenant)

    return grpc.unary_unary_rpc_method_handler(unary_unary, des, ser)


def _bind_only(handler: _Handler, tenant: str) -> _Handler:
    """Client-streaming methods for ``*`` tokens: only bind the tenant."""
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.response_streaming:
        inner_ss: Any = handler.stream_stream

        async def stream_stream(
            requests: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            _CALLER.set(tenant)
            result = inner_ss(requests, context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            elif inspect.isawaitable(result):
                await result

        return grpc.stream_stream_rpc_method_handler(stream_stream, des, ser)
    inner_su: Any = handler.stream_unary

    async def stream_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        _CALLER.set(tenant)
        result = inner_su(requests, context)
        return await result if inspect.isawaitable(result) else result

    return grpc.stream_unary_rpc_method_handler(stream_unary, des, ser)
