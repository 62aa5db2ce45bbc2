"""Entry point of the ``tiermem`` command: the group, global options and error handling."""

from __future__ import annotations

import sys

import click

from tiermem import __version__
from tiermem.cli.doctor import doctor
from tiermem.cli.errors import die_from
from tiermem.errors import TiermemError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tiermem")
@click.option("--debug", is_flag=True, envvar="TIERMEM_DEBUG", help="Show tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """tiermem: tiered memory for VM fleets (userfaultfd + Redis/S3/local page stores)."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


cli.add_command(doctor)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; tiermem errors become one-line messages and exit codes."""
    debug = "--debug" in (argv if argv is not None else sys.argv)
    try:
        cli.main(args=argv, prog_name="tiermem", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        # Bad flags and values are user errors (exit 1), not click's default 2,
        # which tiermem reserves for an unreachable server.
        e.show()
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except TiermemError as e:
        die_from(e, debug)
    except KeyboardInterrupt:
        sys.exit(130)
