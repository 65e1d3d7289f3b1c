"""The ``isdgrid`` command line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import click

from . import __version__
from .errors import GridError

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="isdgrid")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """isdgrid: a Pyro5 remote object grid for simulation drivers."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=0, show_default=True, help="Port (0: any free port).")
@click.option("--secret-file", type=click.Path(dir_okay=False), help="File holding the grid secret.")
@click.option("--secret-stdin", is_flag=True, help="Read the secret from the first line of stdin.")
@click.option("--temp-path", type=click.Path(file_okay=False), help="Working folder (on sys.path).")
@click.option("--uri-file", type=click.Path(dir_okay=False), help="Also write the URI to this file.")
@click.option("--heartbeat-timeout", default=0.0, show_default=True, help="Exit after this many silent seconds (0: never).")
@click.option("--label", default="", help="Name in logs and in the name server.")
@click.option("--nameserver", metavar="HOST:PORT", help="Register the URI at this Pyro5 name server.")
@click.option("--group", default="default", show_default=True, help="Name server group the grid attaches to.")
def daemon(
    host: str,
    port: int,
    secret_file: str | None,
    secret_stdin: bool,
    temp_path: str | None,
    uri_file: str | None,
    heartbeat_timeout: float,
    label: str,
    nameserver: str | None,
    group: str,
) -> None:
    """Start a host daemon by hand; a grid attaches to it by its URI or through a name server."""
    from .daemon import main as daemon_main

    argv = ["--host", host, "--port", str(port), "--heartbeat-timeout", str(heartbeat_timeout)]
    if secret_stdin:
        argv.append("--secret-stdin")
    elif secret_file:
        argv += ["--secret-file", secret_file]
    else:
        raise click.UsageError("give --secret-file FILE or --secret-stdin (the secret never goes on a command line)")
    if temp_path:
        argv += ["--temp-path", temp_path]
    if uri_file:
        argv += ["--uri-file", uri_file]
    if label:
        argv += ["--label", label]
    if nameserver:
        argv += ["--nameserver", nameserver, "--group", group]
    daemon_main(argv)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``isdgrid`` console script."""
    try:
        cli.main(args=list(args) if args is not None else None, prog_name="isdgrid", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except GridError as exc:
        click.echo(f"isdgrid: error: {str(exc).splitlines()[0]}", err=True)
        sys.exit(1)
