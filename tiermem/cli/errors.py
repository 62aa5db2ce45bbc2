"""Exit codes and one-line error reporting for the CLI.

0 success, 1 user error, 2 server unreachable or unavailable, 3 precondition
failure. No traceback unless ``--debug``.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click

from tiermem import errors

EXIT_OK = 0
EXIT_USER = 1
EXIT_UNAVAILABLE = 2
EXIT_PRECONDITION = 3


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


def fail(message: str, code: int = EXIT_USER) -> NoReturn:
    """Stop the command with a one-line error."""
    raise CliExit(message, code)


def die_from(exc: BaseException, debug: bool) -> NoReturn:
    """Print ``exc`` as one line (or a traceback with --debug) and exit with its code."""
    if debug:
        raise exc
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    click.echo(f"tiermem: error: {msg}", err=True)
    sys.exit(exit_code_for(exc))
