"""The ``isdgrid`` command line."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

import click

from . import __version__
from .errors import ConfigError, GridError
from .examples.replica_exchange import SCHEMES

__all__ = ["cli", "main"]

#: Launchers the commands can start daemons with (``attach`` is ``Grid.attach`` in a driver).
LAUNCHERS = ("auto", "local", "ssh", "slurm", "sge")


def _check_launcher(ctx: click.Context, param: click.Parameter, name: str) -> str:
    """Build (and drop) the launcher now, so one that cannot work here fails before anything starts."""
    from .launchers import make_launcher

    try:
        make_launcher(name).close()
    except ConfigError as exc:  # slurm or sge outside a job, for example
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return name


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
@click.option(
    "--heartbeat-timeout", default=0.0, show_default=True, help="Exit after this many silent seconds (0: never)."
)
@click.option("--label", default="", help="Name in logs and in the name server.")
@click.option("--nameserver", metavar="HOST:PORT", help="Register the URI at this Pyro5 name server.")
@click.option("--group", default="default", show_default=True, help="Name server group the grid attaches to.")
@click.option(
    "--slots", type=click.IntRange(1), default=None,
    help="Run a host daemon that forks this many slot workers, each with its own URI (--port P: slot i on P+i).",
)
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
    slots: int | None,
) -> None:
    """Start a daemon by hand; a grid attaches to it by its URI or through a name server.

    With --slots N: one host daemon that forks N slot workers (one URI each, all
    registered at the name server, all in --uri-file one a line); Ctrl-C or SIGTERM ends
    them all.
    """
    if slots is not None:
        from .handstarted import main as host_main

        hand_argv = ["--slots", str(slots), "--bind", host, "--port", str(port),
                     "--heartbeat-timeout", str(heartbeat_timeout)]
        hand_argv += _daemon_options(secret_stdin, secret_file, temp_path, uri_file, label, nameserver, group)
        host_main(hand_argv)
        return
    from .daemon import main as daemon_main

    argv = ["--host", host, "--port", str(port), "--heartbeat-timeout", str(heartbeat_timeout)]
    argv += _daemon_options(secret_stdin, secret_file, temp_path, uri_file, label, nameserver, group)
    daemon_main(argv)


def _daemon_options(
    secret_stdin: bool, secret_file: str | None, temp_path: str | None, uri_file: str | None, label: str,
    nameserver: str | None, group: str,
) -> list[str]:
    """The options ``isdgrid daemon`` passes on to the daemon it runs."""
    argv: list[str] = []
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
    return argv


def _launcher_option(help_text: str) -> Any:
    """The ``--launcher`` option, checked before anything starts."""
    return click.option(
        "--launcher",
        type=click.Choice(LAUNCHERS),
        default="auto",
        show_default=True,
        callback=_check_launcher,
        help=help_text,
    )


@cli.command()
@click.option("--slots", type=click.IntRange(1, 256), help="Local slots, one replica each [default: 4].")
@click.option(
    "--rounds", type=click.IntRange(1), default=200, show_default=True,
    help="Exchange rounds of the whole run (with --resume: the checkpointed run's, unless given).",
)
@click.option(
    "--steps", type=click.IntRange(1), default=200, show_default=True, help="Metropolis steps per replica and round."
)
@click.option("--hosts", "hosts_file", metavar="FILE", help="Hosts file (TOML): one replica per slot of its hosts.")
@_launcher_option("How the daemons start.")
@click.option(
    "--scheme", type=click.Choice(SCHEMES), default="gromacs", show_default=True, help="How swap pairs are picked."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the run (same seed and slots: same run).")
@click.option(
    "--tmax", type=click.FloatRange(1.0), default=6.0, show_default=True, help="Highest temperature (lowest 1)."
)
@click.option("--log", "log_path", metavar="FILE", help="Write the replica-per-temperature log to FILE.")
@click.option(
    "--checkpoint", "checkpoint_path", metavar="FILE",
    help="Write a run checkpoint to FILE every --checkpoint-every rounds (atomically).",
)
@click.option(
    "--checkpoint-every", type=click.IntRange(1), default=10, show_default=True,
    help="Rounds between checkpoints; a lost host sends the run back to the last one.",
)
@click.option(
    "--resume", "resume_path", metavar="FILE",
    help="Continue the run checkpointed in FILE (its settings, replicas and log; new hosts allowed).",
)
@click.option(
    "--trust-checkpoint", is_flag=True,
    help="Load the --resume FILE even if another user owns it or others can write it (loading it runs its code).",
)
@click.option(
    "--engine", type=click.Choice(("toy", "openmm")), default="toy", show_default=True,
    help="toy: Monte Carlo of a 2D model; openmm: MD of alanine dipeptide (steps of 2 fs, --tmax in K, default 500).",
)  # fmt: skip
@click.option(
    "--platform", type=click.Choice(("CUDA", "OpenCL", "CPU", "Reference")), default=None,
    help="OpenMM platform of the replicas (--engine openmm) [default: CPU]; CUDA and OpenCL: each on its slot's GPU.",
)  # fmt: skip
def demo(
    slots: int | None,
    rounds: int,
    steps: int,
    hosts_file: str | None,
    launcher: str,
    scheme: str,
    seed: int,
    tmax: float,
    log_path: str | None,
    checkpoint_path: str | None,
    checkpoint_every: int,
    resume_path: str | None,
    trust_checkpoint: bool,
    engine: str,
    platform: str | None,
) -> None:
    """Run a replica-exchange Monte Carlo demo on local slots (nothing to configure).

    The run survives lost hosts: daemons are respawned and the run goes back to its last
    checkpoint (taken every --checkpoint-every rounds). With --checkpoint FILE a killed
    run continues with --resume FILE.
    """
    from .examples.demo_grid import demo_hosts
    from .examples.run_checkpoint import RunCheckpoint

    # Every option is checked before a daemon starts (click checked the types and the launcher).
    ctx = click.get_current_context()
    resume = None
    total_rounds = rounds
    if resume_path is not None:
        resume = _load_checkpoint(RunCheckpoint, resume_path, trust_checkpoint)
        settings = resume.driver_state()["settings"]
        engine = _resumed_engine(ctx, engine, settings.get("engine", "toy"))
        _check_unchanged(ctx, settings, steps, scheme, seed, tmax, checkpoint_every)
        if ctx.get_parameter_source("rounds") is click.core.ParameterSource.DEFAULT:
            total_rounds = settings["target_rounds"]
        checkpoint_path = checkpoint_path or resume_path
        log_path = log_path or resume.log_path
    replicas = len(resume.snapshot.states) if resume is not None else None
    if platform is not None and engine != "openmm":
        raise click.UsageError("--platform is an option of --engine openmm")
    if engine == "openmm":  # isdgrid/examples/openmm_demo.py; --tmax (in K) counts only when given
        from .examples import openmm_demo

        given = ctx.get_parameter_source("tmax") is not click.core.ParameterSource.DEFAULT
        hosts, t_max = openmm_demo.check_options(
            slots=slots, hosts_file=hosts_file, t_max=tmax if given else None, default_slots=replicas or 4,
            platform=platform or "CPU", launcher=launcher,
        )
    else:
        hosts, t_max = demo_hosts(slots, hosts_file, default_slots=replicas or 4), tmax
    n_slots = sum(h.n_cpu for h in hosts)
    if replicas is not None and n_slots != replicas:
        raise click.UsageError(f"{resume_path} holds {replicas} replicas: give {replicas} slots in all, not {n_slots}")
    log_file: IO[str] | None = None
    if log_path is not None:
        log_file = _open_log_to_continue(log_path) if resume is not None else _open_for_writing(log_path, "--log")
    if resume is not None:
        click.echo(f"resuming {resume_path} at round {resume.rounds}", err=True)
    try:
        if engine == "openmm":
            openmm_demo.run_cli(
                hosts, rounds=total_rounds, steps=steps, launcher=launcher, scheme=scheme, seed=seed, t_max=t_max,
                log=log_file, checkpoint_every=checkpoint_every, checkpoint_path=checkpoint_path, resume=resume,
                platform=platform or "CPU",
            )
            verdict = None
        else:
            verdict = _run_toy_demo(
                hosts, launcher, rounds=total_rounds, steps=steps, scheme=scheme, seed=seed, t_max=t_max,
                log=log_file, checkpoint_every=checkpoint_every, checkpoint_path=checkpoint_path, resume=resume,
            )
    finally:
        if log_file is not None:
            log_file.close()
    if log_path is not None:
        click.echo(f"replica log (replica at each temperature, per round): {log_path}")
    if checkpoint_path is not None:
        click.echo(f"run checkpoint (isdgrid demo --resume {checkpoint_path} --rounds N goes on): {checkpoint_path}")
    if verdict == "FAIL":
        raise click.ClickException("the sampled distribution does not match the Boltzmann distribution")


def _run_toy_demo(hosts: Any, launcher: str, *, rounds: int, resume: Any, **options: Any) -> str | None:
    """The Monte Carlo demo on a grid with a progress bar; prints the report, returns the check's verdict."""
    from .examples.demo_grid import run_with_progress
    from .examples.replica_exchange import format_report, run_demo

    report = run_with_progress(
        hosts, launcher, rounds=rounds, label="replica exchange", resume=resume,
        run=lambda grid, progress, startup: run_demo(
            grid, rounds=rounds, progress=progress, startup_time=startup, resume=resume, **options
        ),
    )
    for line in format_report(report):
        click.echo(line)
    return report.check.verdict if report.check is not None else None


def _resumed_engine(ctx: click.Context, given: str, checkpointed: str) -> str:
    """The engine of a resumed run: the checkpoint's; an --engine that differs is a usage error."""
    if ctx.get_parameter_source("engine") is not click.core.ParameterSource.DEFAULT and given != checkpointed:
        raise click.UsageError(f"--engine {given}: the checkpointed run is a {checkpointed} run")
    return checkpointed


def _check_unchanged(
    ctx: click.Context, settings: dict[str, Any], steps: int, scheme: str, seed: int, tmax: float, every: int
) -> None:
    """Options given with --resume must agree with the checkpointed run's settings."""
    given: dict[str, tuple[Any, Any]] = {
        "steps": (steps, settings["steps"]),
        "scheme": (scheme, settings["scheme"]),
        "seed": (seed, settings["seed"]),
        "tmax": (tmax, round(settings["temperatures"][-1], 9)),
        "checkpoint_every": (every, settings["checkpoint_every"]),
    }
    changed = [
        f"--{name.replace('_', '-')} {mine} (the run has {theirs})"
        for name, (mine, theirs) in given.items()
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT and mine != theirs
    ]
    if changed:
        raise click.UsageError(f"{', '.join(changed)}: a resumed run keeps its checkpoint's settings")


def _load_checkpoint(kind: Any, path: str, trust: bool) -> Any:
    """Read a run checkpoint for --resume; a bad (or untrusted) file is a usage error naming it."""
    from .errors import CheckpointError

    try:
        checkpoint = kind.load(path, trust=trust)
        checkpoint.driver_state()  # a damaged driver state is refused here, before a daemon starts
        return checkpoint
    except CheckpointError as exc:
        raise click.BadParameter(str(exc), ctx=click.get_current_context(), param_hint="'--resume'") from None


def _open_log_to_continue(path: str) -> IO[str]:
    """Open the replica log of a resumed run for update (the driver cuts it back to the checkpoint)."""
    try:
        return open(path, "r+", encoding="utf-8")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        raise click.BadParameter(
            f"cannot continue the log {path!r}: {exc.strerror or exc}", ctx=click.get_current_context(),
            param_hint="'--log'",
        ) from None


def _open_for_writing(path: str, option: str) -> IO[str]:
    """Open an output file named by ``option`` now, before anything starts; a bad path is a usage error."""
    try:
        return open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        raise click.BadParameter(
            f"cannot write {path!r}: {exc.strerror or exc}", ctx=click.get_current_context(), param_hint=f"'{option}'"
        ) from None


@cli.command()
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option(
    "--interval", type=click.FloatRange(0.1), default=1.0, show_default=True, help="Seconds between refreshes."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (one JSON document per refresh).")
@click.option("--run-dir", metavar="DIR", default=None, help="Folder of status files [default: see docs/cli.md].")
@click.option("--count", type=click.IntRange(0), default=0, hidden=True, help="Refreshes with --watch (0: no limit).")
def status(watch: bool, interval: float, as_json: bool, run_dir: str | None, count: int) -> None:
    """Show the hosts, slots and services of the grids running now."""
    from .statusfile import format_status, read_status_files
    from .statusfile import run_dir as default_run_dir

    folder = run_dir or default_run_dir()
    shown = 0
    try:
        while True:
            documents = read_status_files(folder)
            if as_json:
                click.echo(json.dumps(documents, indent=None if watch else 1))
            else:
                if watch and sys.stdout.isatty():
                    click.clear()
                if documents:
                    for line in format_status(documents):
                        click.echo(line)
                else:
                    click.echo(f"no running isdgrid driver (status files in {folder})")
            shown += 1
            if not watch or (count and shown >= count):
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return


@cli.command()
@click.argument("hosts_file", metavar="HOSTS_FILE")
@_launcher_option("How the daemons start on the hosts.")
@click.option(
    "--timeout", type=click.FloatRange(1.0), default=30.0, show_default=True, help="Seconds a host may take to start."
)
@click.option("--pings", type=click.IntRange(1), default=5, show_default=True, help="Pings timed per host (median).")
def check(hosts_file: str, launcher: str, timeout: float, pings: int) -> None:
    """Start, ping and stop one daemon on each host of HOSTS_FILE."""
    from .checkhosts import check_hosts
    from .hosts import load_hosts

    hosts = load_hosts(hosts_file)
    results = check_hosts(hosts, launcher, start_timeout=timeout, pings=pings)
    for result in results:
        click.echo(result.line(), err=not result.ok)
    failed = [r.host for r in results if not r.ok]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(results)} hosts failed: {', '.join(failed)}")
    click.echo(f"all {len(results)} hosts ok")


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``isdgrid`` console script.

    User errors (bad options, a bad hosts file, a host that does not start) end with one
    line on stderr and a non-zero exit status, never a traceback.
    """
    try:
        cli.main(args=list(args) if args is not None else None, prog_name="isdgrid", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "isdgrid"
        click.echo(f"{where}: error: {exc.format_message()} (see {where} --help)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"isdgrid: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except GridError as exc:
        click.echo(f"isdgrid: error: {str(exc).splitlines()[0]}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"isdgrid: error: {exc}", err=True)
        sys.exit(1)
