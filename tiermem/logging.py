"""Structured logging for every tiermem process: JSON by default, console on request, no secrets.

:func:`configure_logging` sets up structlog and routes the standard library's
loggers (grpc, botocore, redis) through the same processors, so every line is
one JSON object and goes through :func:`redact_secrets`:

* values under keys that name a secret (password, token, secret, authorization,
  api/access/private key, credential, cookie, ...) become ``***``;
* in every string: the password of a URL (``redis://user:pw@host`` ->
  ``redis://user:***@host``), secret-looking query parameters, and bearer tokens
  are masked, including in formatted tracebacks.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

__all__ = ["REDACTED", "configure_logging", "redact_secrets", "redact_text"]

REDACTED = "***"
_SECRET_KEY = re.compile(
    r"pass(w(or)?d)?$|passphrase|secret|token|authori[sz]ation|api[-_]?key|access[-_]?key|private[-_]?key"
    r"|credential|cookie|session[-_]?id|requirepass|signature",
    re.IGNORECASE,
)
# scheme://user:password@  (the user part may be empty: redis://:pw@host)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):(?P<pw>[^@\s/]+)@")
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&;](?:[A-Za-z0-9_.-]*(?:password|secret|token|signature|key|credential)[A-Za-z0-9_.-]*)=)"
    r"(?P<val>[^&;\s#]+)",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?P<head>\b(?:bearer|basic)\s+)(?P<val>[A-Za-z0-9._~+/=-]+)", re.IGNORECASE)
_MAX_DEPTH = 6


def redact_text(text: str) -> str:
    """``text`` with URL passwords, secret query parameters and bearer tokens masked."""
    text = _URL_PASSWORD.sub(rf"\g<head>:{REDACTED}@", text)
    text = _QUERY_SECRET.sub(rf"\g<head>{REDACTED}", text)
    return _BEARER.sub(rf"\g<head>{REDACTED}", text)


def _redact(value: Any, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes):
        return value  # payloads are logged by size, never decoded here
    if isinstance(value, Mapping):
        return {
            k: (
                REDACTED
                if isinstance(k, str) and _SECRET_KEY.search(k) and v not in (None, "")
                else _redact(v, depth + 1)
            )
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        items = [_redact(v, depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def redact_secrets(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask secrets in every key and value of the event."""
    for key in list(event_dict):
        value = event_dict[key]
        if _SECRET_KEY.search(key) and value not in (None, ""):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact(value)
    return event_dict


def configure_logging(json: bool = True, level: str | int = "INFO", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger for this process (idempotent)."""
    lvl = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(lvl, int):
        raise ValueError(f"unknown log level {level!r}")
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    # Tracebacks are rendered to text before redaction, so secrets in exception messages are masked too.
    tail: list[Any] = [structlog.processors.format_exc_info, redact_secrets]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *tail,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    handler.set_name("tiermem")
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == "tiermem":
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(lvl)
    # Chatty libraries whose DEBUG lines carry request headers stay at WARNING.
    for name in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(name).setLevel(max(lvl, logging.WARNING))
