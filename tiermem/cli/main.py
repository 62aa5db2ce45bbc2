"""Entry point of the ``tiermem`` command: the group, global options and error handling.

Shell completion is click's: ``eval "$(_TIERMEM_COMPLETE=bash_source tiermem)"``
(``zsh_source`` and ``fish_source`` for the other shells).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from tiermem import __version__
from tiermem.cli.bench import bench
from tiermem.cli.cycle import cycle
from tiermem.cli.demo import demo
from tiermem.cli.doctor import doctor
from tiermem.cli.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USER,
    CliExit,
    cli_exit_from,
    die_from,
    usage_error_line,
)
from tiermem.cli.events import events
from tiermem.cli.node import node
from tiermem.cli.options import connection_options
from tiermem.cli.policy import policy
from tiermem.cli.serve import serve
from tiermem.cli.simulate import simulate
from tiermem.cli.snapshot import snapshot
from tiermem.cli.vm import vm
from tiermem.errors import TiermemError

__all__ = ["TiermemGroup", "cli", "main"]

_EPILOG = """\b
Exit codes: 0 ok, 1 user error, 2 server unreachable or unavailable, 3 precondition failed.
Shell completion (bash): eval "$(_TIERMEM_COMPLETE=bash_source tiermem)"
                  (zsh):  eval "$(_TIERMEM_COMPLETE=zsh_source tiermem)"
"""


class TiermemGroup(click.Group):
    """The root group: turns every error into one line and an exit code.

    Doing this here (not only in :func:`main`) keeps the behaviour identical
    under ``click.testing.CliRunner`` and ``python -m tiermem.cli``.
    """

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        """Parse the root options; a usage error becomes one line and exit 1."""
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help() if e.ctx else self.get_help(click.Context(self)))
            raise click.exceptions.Exit(EXIT_OK) from None
        except click.UsageError as e:
            raise CliExit(usage_error_line(e), EXIT_USER) from None

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand, mapping usage errors and tiermem errors to one-line exits."""
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError as e:
            # A bare group (``tiermem policy``) shows its help, like kubectl.
            click.echo(e.ctx.get_help() if e.ctx else ctx.get_help())
            raise click.exceptions.Exit(EXIT_OK) from None
        except CliExit:
            raise
        except click.UsageError as e:
            raise CliExit(usage_error_line(e), EXIT_USER) from None
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except TiermemError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise cli_exit_from(e, ctx.obj.get("server") if ctx.obj else None) from None
        except BrokenPipeError:
            # ``tiermem events --json | head``: the reader went away; not an error.
            _silence_stdout()
            raise click.exceptions.Exit(EXIT_OK) from None
        except (KeyboardInterrupt, EOFError):
            raise
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise CliExit(
                f"internal error: {type(e).__name__}: {e} (run with --debug for a traceback)", EXIT_USER
            ) from None


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush into a closed pipe stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (a test runner's buffer): nothing will be flushed to a pipe


@click.group(cls=TiermemGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_EPILOG)
@click.version_option(__version__, prog_name="tiermem")
@click.option("--debug", is_flag=True, envvar="TIERMEM_DEBUG", help="Show tracebacks.")
@connection_options
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """tiermem: tiered memory for VM fleets (userfaultfd + Redis/S3/local page stores)."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


cli.add_command(doctor)
cli.add_command(policy)
cli.add_command(vm)
cli.add_command(cycle)
cli.add_command(node)
cli.add_command(events)
cli.add_command(serve)
cli.add_command(simulate)
cli.add_command(snapshot)
cli.add_command(bench)
cli.add_command(demo)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI; tiermem errors become one-line messages and exit codes."""
    args = list(argv) if argv is not None else sys.argv[1:]
    debug = "--debug" in args or os.environ.get("TIERMEM_DEBUG", "") not in ("", "0", "false")
    try:
        rv = cli.main(args=args, prog_name="tiermem", standalone_mode=False)
        # Without standalone mode click returns an Exit's code instead of exiting.
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except click.exceptions.Abort:
        click.echo("tiermem: aborted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.UsageError as e:
        # Bad flags and values are user errors (exit 1), not click's default 2,
        # which tiermem reserves for an unreachable server.
        click.echo(f"tiermem: error: {usage_error_line(e)}", err=True)
        sys.exit(EXIT_USER)
    except CliExit as e:
        e.show()
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"tiermem: error: {' '.join(e.format_message().split())}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except TiermemError as e:
        die_from(e, debug)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(EXIT_OK)
    except Exception as e:
        if debug:
            raise
        click.echo(
            f"tiermem: error: internal error: {type(e).__name__}: {e} (run with --debug for a traceback)",
            err=True,
        )
        sys.exit(EXIT_USER)
