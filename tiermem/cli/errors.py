"""Exit codes and one-line error reporting for the CLI.

0 success, 1 user error, 2 server unreachable or unavailable, 3 precondition
failure. No traceback unless ``--debug``. Every error is one line on stderr:
``tiermem: error: <what went wrong>``.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec
from typing import NoReturn

import click

from tiermem import errors

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PRECONDITION",
    "EXIT_UNAVAILABLE",
    "EXIT_USER",
    "CliExit",
    "cli_exit_from",
    "die_from",
    "exit_code_for",
    "fail",
    "message_for",
    "require_extra",
    "usage_error_line",
]

EXIT_OK = 0
EXIT_USER = 1
EXIT_UNAVAILABLE = 2
EXIT_PRECONDITION = 3
EXIT_INTERRUPTED = 130

# Phrases gRPC puts in UNAVAILABLE details when the client never reached the server,
# as opposed to the server answering UNAVAILABLE about one of its own dependencies.
_UNREACHABLE = (
    "failed to connect",
    "connection refused",
    "connect failed",
    "dns resolution failed",
    "name resolution",
    "socket closed",
    "connection reset",
    "no route to host",
    "handshake",
    "ssl",
    "unreachable",
    "failed to create secure",
    "empty address list",
)


class CliExit(click.ClickException):
    """An error printed as one line, with a chosen exit code."""

    def __init__(self, message: str, code: int = EXIT_USER) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]

    def show(self, file: object = None) -> None:
        """Print ``tiermem: error: <message>`` on stderr."""
        click.echo(f"tiermem: error: {self.format_message()}", err=True)


def exit_code_for(exc: BaseException) -> int:
    """Map a tiermem error to the CLI exit code."""
    if isinstance(exc, errors.Unavailable):
        return EXIT_UNAVAILABLE
    if isinstance(exc, errors.FailedPrecondition | errors.StoreFull):
        return EXIT_PRECONDITION
    return EXIT_USER


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def message_for(exc: BaseException, server: str | None = None) -> str:
    """The one-line message for ``exc``; ``server`` names the control plane the CLI was talking to."""
    msg = _first_line(exc)
    if not isinstance(exc, errors.Unavailable) or server is None:
        return msg
    detail = msg.removeprefix("server unavailable: ")
    code = getattr(getattr(exc, "code", None), "name", "")
    if code == "DEADLINE_EXCEEDED":
        return f"control plane at {server} did not answer in time: {detail}"
    if any(p in detail.lower() for p in _UNREACHABLE):
        return f"control plane at {server} is unreachable: {detail}"
    return f"control plane at {server} is unavailable: {detail}"


def cli_exit_from(exc: BaseException, server: str | None = None) -> CliExit:
    """A CliExit carrying ``exc``'s one-line message and exit code."""
    return CliExit(message_for(exc, server), exit_code_for(exc))


def usage_error_line(e: click.UsageError) -> str:
    """One line for a usage error: ``--interval: invalid duration 'abc': ...`` or click's message."""
    missing = isinstance(e, click.MissingParameter)
    if isinstance(e, click.BadParameter) and e.param is not None and not missing and e.message:
        p = e.param
        if isinstance(p, click.Option):
            name = next((o for o in p.opts if o.startswith("--")), p.opts[0])
        else:
            name = (p.human_readable_name or p.name or "value").upper()
        return f"{name}: {e.message}"
    msg = " ".join(e.format_message().split())
    if e.ctx is not None:
        msg += f" (see '{e.ctx.command_path} --help')"
    return msg


def fail(message: str, code: int = EXIT_USER) -> NoReturn:
    """Stop the command with a one-line error."""
    raise CliExit(message, code)


def die_from(exc: BaseException, debug: bool, server: str | None = None) -> NoReturn:
    """Print ``exc`` as one line (or re-raise it with --debug) and exit with its code."""
    if debug:
        raise exc
    click.echo(f"tiermem: error: {message_for(exc, server)}", err=True)
    sys.exit(exit_code_for(exc))


def require_extra(module: str, extra: str, what: str) -> None:
    """Fail with one line naming the extra that installs ``module`` when it is not installed.

    Checked by the import system's finders, without importing ``module`` (matplotlib is slow to import).
    """
    try:
        found = find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module stubbed out as None
        found = False
    if not found:
        fail(
            f"{what} needs {module}, an optional dependency: pip install 'tiermem[{extra}]'",
            EXIT_PRECONDITION,
        )
