"""`ci-controller`: run the controller until SIGTERM or Ctrl-C (a warm stop).

All error handling is here: a `CIError` (or a database that cannot be opened) prints one line,
`Error: <message>`, on stderr and exits non-zero; a traceback only with --debug.
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import sys
import threading
from types import FrameType

import click

from ci_common.errors import CIError
from ci_common.repository import Repository
from ci_common.settings import Settings
from ci_controller import lease
from ci_controller.docker_runtime import DockerRuntime
from ci_controller.lease import LeaseKeeper
from ci_controller.metrics import ControllerMetrics
from ci_controller.reconciler import Controller
from ci_persistence import open_repository

log = logging.getLogger("ci_controller")


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not debug:  # the SDK's HTTP chatter is noise at INFO
        logging.getLogger("urllib3").setLevel(logging.WARNING)


def _open_repository(settings: Settings) -> Repository:
    # PostgreSQL's failures arrive as CIError already, naming the URL without its password.
    try:
        return open_repository(settings)
    except sqlite3.Error as exc:
        raise CIError(f"cannot open the database {settings.db_path}: {exc}") from exc
    except OSError as exc:
        raise CIError(f"cannot open the database {settings.db_path}: {exc.strerror}") from exc


def run(settings: Settings, stop: threading.Event) -> None:
    """Serve metrics if asked, open the database, take the lease on the controller id, then
    reconcile until `stop`."""
    metrics = ControllerMetrics()
    if settings.metrics_port is not None:  # first: a taken port fails before anything is held
        metrics.serve(settings.metrics_port)
        log.info("metrics on port %d", settings.metrics_port)
    repository = _open_repository(settings)
    try:
        held = lease.acquire(settings, repository)
        keeper = LeaseKeeper(repository, held, settings.controller_lease_s, on_lost=stop.set)
        keeper.start()
        try:
            Controller(settings, repository, DockerRuntime(), fence=held.fence,
                       metrics=metrics).run_forever(stop)
        finally:
            keeper.stop(release=True)
        if keeper.lost.is_set():
            raise CIError(f"controller {settings.controller_id}: lost the lease on its id to "
                          "another controller; stopped")
    finally:
        repository.close()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db-path", type=str, default=None,
              help="SQLite database file (CI_DB_PATH; default ci_jobs.db).")
@click.option("--database-url", type=str, default=None,
              help="PostgreSQL instead of SQLite: postgresql://user@host:port/db "
                   "(CI_DATABASE_URL; wins over --db-path).")
@click.option("--interval", type=float, default=None,
              help="Seconds between full reconciles (CI_RECONCILE_INTERVAL; default 2.0).")
@click.option("--max-jobs", type=click.IntRange(min=1), default=None,
              help="Jobs run at the same time (CI_MAX_CONCURRENT_JOBS; default 4).")
@click.option("--metrics-port", type=click.IntRange(min=1, max=65535), default=None,
              help="Serve Prometheus metrics on this port (CI_METRICS_PORT; default: off).")
@click.option("--debug", is_flag=True, help="Verbose logs, and tracebacks on errors.")
def command(db_path: str | None, database_url: str | None, interval: float | None,
            max_jobs: int | None, metrics_port: int | None, debug: bool) -> None:
    """Run queued CI jobs in Docker containers until stopped (SIGTERM or Ctrl-C)."""
    _configure_logging(debug)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():
            log.info("%s received: warm stop (running containers are left running)",
                     signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        settings = Settings.from_env(db_path=db_path, database_url=database_url,
                                     reconcile_interval_s=interval,
                                     max_concurrent_jobs=max_jobs,
                                     metrics_port=metrics_port)
        run(settings, stop)
    except CIError as exc:
        if debug:
            raise
        click.echo(f"Error: {exc.message}", err=True)
        sys.exit(exc.exit_code)


def main() -> None:
    """Entry point of the `ci-controller` command."""
    command()
