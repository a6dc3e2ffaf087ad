"""The `ci` command: submit a project's tests, wait for a job, list jobs.

Status lines go to stderr and the job's output to stdout, byte for byte as the server sent it,
so `ci submit test > out.txt` captures exactly the test run. Every error is reported in one
place (`_CIGroup.invoke`): one `Error: …` line on stderr, a traceback only with `--debug`.

Exit codes: 0 the tests passed; 1 they did not, or an error; 2 a usage or input error (e.g.
not in a project root); 130 interrupted with Ctrl-C.

Shell completion is click's own: `eval "$(_CI_COMPLETE=bash_source ci)"` (zsh_source,
fish_source); see the README.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ci_client.lazy import lazy_module
from ci_common.errors import CIError
from ci_common.statuses import JobStatus

if TYPE_CHECKING:
    import httpx

    from ci_client import events, packing, render, wire
    from ci_client.client import CIClient, ReconnectPolicy, Since
    from ci_client.config import ClientConfig
    from ci_client.queue_line import QueueLine
else:  # imported on first use: `ci --help` needs none of them (zipfile, json, dataclasses…)
    events = lazy_module("ci_client.events")
    packing = lazy_module("ci_client.packing")
    render = lazy_module("ci_client.render")
    wire = lazy_module("ci_client.wire")

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class CLIState:
    """Per-invocation state on `ctx.obj`; tests pass one in to inject a transport or config."""

    api_key: str | None = None
    server: str | None = None
    debug: bool = False
    transport: httpx.BaseTransport | None = None  # None: real network
    environ: Mapping[str, str] | None = None  # None: os.environ
    config_path: Path | None = None  # None: ~/.ci/config
    reconnect: ReconnectPolicy | None = None

    def config(self, max_upload: str | None = None) -> ClientConfig:
        """The resolved configuration (options > environment > config file > defaults)."""
        from ci_client.config import load_config

        return load_config(api_key=self.api_key, server=self.server, max_upload=max_upload,
                           environ=os.environ if self.environ is None else self.environ,
                           config_path=self.config_path)

    def client(self, config: ClientConfig) -> CIClient:
        """A client for the configured servers; raises when no API key was found."""
        from ci_client.client import CIClient

        return CIClient(config.server_urls, config.require_api_key(), transport=self.transport,
                        reconnect=self.reconnect, environ=self.environ)


def _store(attribute: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value is not None and value is not False:
            setattr(ctx.ensure_object(CLIState), attribute, value)
    return callback


def connection_options(func: F) -> F:
    """--api-key, --server and --debug, accepted on the group and after any subcommand."""
    options = [
        click.option("--api-key", metavar="KEY", expose_value=False, callback=_store("api_key"),
                     help="API key (default: $CI_API_KEY, then api_key= in ~/.ci/config)."),
        click.option("--server", metavar="URL[,URL…]", expose_value=False,
                     callback=_store("server"),
                     help="Server URL(s), comma-separated for fail-over "
                          "(default: $CI_SERVER_URL, then ~/.ci/config, then "
                          "http://localhost:8000)."),
        click.option("--debug", is_flag=True, default=False, expose_value=False,
                     callback=_store("debug"), help="Show tracebacks of errors."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


class _CIGroup(click.Group):
    """The top-level group: the one place where errors become `Error: …` lines."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except CIError as exc:
            _report(ctx, exc, exc.message)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            _status("Interrupted.")
            ctx.exit(EXIT_INTERRUPTED)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise  # click's main() silences a closed stdout (`ci list | head`)
            _report(ctx, exc, str(exc))
            ctx.exit(1)
        except Exception as exc:  # noqa: BLE001 - a bug must still not spill a traceback
            _report(ctx, exc, f"unexpected {type(exc).__name__}: {exc} "
                              "(rerun with --debug for the traceback)")
            ctx.exit(1)


def _report(ctx: click.Context, exc: BaseException, message: str) -> None:
    state = ctx.find_object(CLIState)
    if state is not None and state.debug:
        import traceback  # only with --debug: it is not free to import (issue #10)

        traceback.print_exception(exc, file=sys.stderr)
    click.echo(f"Error: {' '.join(message.split())}", err=True)


def _status(message: str) -> None:
    click.echo(message, err=True)


def _write_output(text: str) -> None:
    """Job output to stdout unchanged (click.echo would strip colour codes when piped)."""
    out = sys.stdout
    try:
        out.write(text)
    except UnicodeEncodeError:
        encoding = getattr(out, "encoding", None) or "utf-8"
        out.write(text.encode(encoding, "replace").decode(encoding))
    out.flush()


@click.group(cls=_CIGroup, context_settings={"help_option_names": ["-h", "--help"]})
@connection_options
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Run a Python project's tests on the CI service and stream the output live."""
    ctx.ensure_object(CLIState)


@cli.group()
def submit() -> None:
    """Submit work to the CI service."""


def _junit_target(_ctx: click.Context, _param: click.Parameter,
                  value: str | None) -> Path | None:
    """--junit-xml FILE: checked before anything is sent, so a typo costs no test run."""
    if value is None:
        return None
    path = Path(value)
    if path.is_dir():
        raise click.BadParameter(f"{value} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise click.BadParameter(f"directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise click.BadParameter(f"{value} is not writable")
    return path


def junit_option(func: F) -> F:
    return click.option(
        "--junit-xml", "junit_xml", metavar="FILE", callback=_junit_target,
        help="Write the job's JUnit XML report to FILE when it ends (none: says why on "
             "stderr; the exit code stays the job's).")(func)


@submit.command("test")
@click.option("--async", "run_async", is_flag=True,
              help="Print the job id and return at once (stdout: `Job submitted: <id>`).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Fail the job if it runs longer than this.")
@click.option("--python", "python", metavar="VERSION",
              help="Run on this Python version (the server lists them at GET /info; "
                   "default: the server's default).")
@junit_option
@click.option("--max-upload", metavar="SIZE",
              help="Refuse archives over this size (default: $CI_MAX_UPLOAD or 50MB).")
@click.option("--no-cache", is_flag=True,
              help="Install the requirements afresh instead of starting from the cached "
                   "environment (the fresh one then replaces it).")
@click.argument("pytest_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- PYTEST_ARGS...]")
@connection_options
@click.pass_context
def submit_test(ctx: click.Context, run_async: bool, timeout: float | None, python: str | None,
                junit_xml: Path | None, max_upload: str | None, no_cache: bool,
                pytest_args: tuple[str, ...]) -> None:
    """Pack the project in the current directory, run its tests, stream the output.

    Arguments after `--` go to pytest as they are, e.g. `ci submit test -- -k slow -x`.
    """
    from ci_common.pytest_args import check_pytest_args

    state = ctx.ensure_object(CLIState)
    check_pytest_args(pytest_args)  # the server checks too; this spares the upload
    if run_async and junit_xml is not None:
        raise click.UsageError("--junit-xml needs the job to end: use it without --async "
                               "(or later with `ci wait <id> --junit-xml FILE`)")
    config = state.config(max_upload)
    config.require_api_key()  # before packing: no point packing what cannot be sent
    packed = packing.pack(Path.cwd(), config.max_upload_bytes)
    _status(f"Packing project… {packing.describe_archive(packed)}")
    _status("Uploading…")
    with state.client(config) as client:
        created = client.submit(packed.archive, timeout, pytest_args=pytest_args, python=python,
                                no_cache=no_cache)
        if run_async:
            click.echo(f"Job submitted: {created.id}")
            return
        _status(f"Job submitted: {created.id}")
        try:
            code = _follow(client, created.id, "start", state)
        except KeyboardInterrupt:
            _cancel_after_interrupt(client, created.id)
            ctx.exit(EXIT_INTERRUPTED)
        code = _write_junit(client, created.id, junit_xml, code)
    ctx.exit(code)


@cli.command("wait")
@click.argument("job_id")
@click.option("--all", "show_all", is_flag=True, help="Show the output from the beginning.")
@junit_option
@connection_options
@click.pass_context
def wait(ctx: click.Context, job_id: str, show_all: bool, junit_xml: Path | None) -> None:
    """Stream a job's output until it ends; exit 0 if its tests passed."""
    state = ctx.ensure_object(CLIState)
    with state.client(state.config()) as client:
        job = client.get_job(job_id)
        if job.status.is_terminal and not show_all:
            _status(render.already_finished_line(job))
            for line in [] if job.report is None else render.report_lines(job.report):
                _status(line)
            ctx.exit(_write_junit(client, job_id, junit_xml, render.exit_code_for(job.success)))
        if not show_all:
            _status(f"Status: {job.status.value}")
        try:
            code = _follow(client, job_id, "start" if show_all else "now", state)
        except KeyboardInterrupt:
            _status(f"Stopped waiting; job {job_id} continues to run "
                    f"(`ci wait {job_id}` resumes).")
            ctx.exit(EXIT_INTERRUPTED)
        code = _write_junit(client, job_id, junit_xml, code)
    ctx.exit(code)


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option("--limit", type=click.IntRange(min=1, max=100_000), default=50, show_default=True,
              help="How many of the newest jobs to show.")
@click.option("--status", type=click.Choice([s.value for s in JobStatus]),
              help="Only jobs in this status.")
@connection_options
@click.pass_context
def list_jobs(ctx: click.Context, as_json: bool, limit: int, status: str | None) -> None:
    """List your jobs, newest first."""
    state = ctx.ensure_object(CLIState)
    with state.client(state.config()) as client:
        page = client.newest_jobs(limit, None if status is None else JobStatus(status))
    if as_json:
        click.echo(render.jobs_json(page.jobs))
        return
    click.echo(render.jobs_table(page.jobs))
    if page.total > len(page.jobs):
        _status(f"Showing the newest {len(page.jobs)} of {page.total} jobs (see --limit).")


@cli.command("cancel")
@click.argument("job_id")
@connection_options
@click.pass_context
def cancel(ctx: click.Context, job_id: str) -> None:
    """Cancel a job and wait until it has stopped; a finished job is left as it is."""
    state = ctx.ensure_object(CLIState)
    with state.client(state.config()) as client:
        job = client.cancel(job_id)
        if not job.status.is_terminal:
            _status(f"Cancelling job {job_id}…")
            try:
                _wait_for_end(client, job_id)
            except KeyboardInterrupt:
                _status(f"Stopped waiting; the cancel of job {job_id} goes on.")
                ctx.exit(EXIT_INTERRUPTED)
            job = client.get_job(job_id)
    _status(render.cancel_line(job_id, job))


@cli.command("logs")
@click.argument("job_id")
@click.option("--tail", type=click.IntRange(min=1, max=1_000_000), metavar="N",
              help="Only the last N lines.")
@connection_options
@click.pass_context
def logs(ctx: click.Context, job_id: str, tail: int | None) -> None:
    """Print a job's output stored so far and return (`ci wait` follows it)."""
    state = ctx.ensure_object(CLIState)
    with state.client(state.config()) as client:
        text = client.get_log(job_id, tail)
        if not text:
            job = client.get_job(job_id)
            if job.pruned_at is not None:
                _status(f"The output of job {job_id} was removed "
                        f"{render.format_time(job.pruned_at)} (retention).")
    _write_output(text)


@cli.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the job as a JSON object.")
@connection_options
@click.pass_context
def show(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Show one job's details: status, result, reason and times."""
    state = ctx.ensure_object(CLIState)
    with state.client(state.config()) as client:
        job = client.get_job(job_id)
    click.echo(wire.dumps(job) if as_json else render.job_details(job))


def _wait_for_end(client: CIClient, job_id: str) -> None:
    """Block until the job's END event (its output is not shown)."""
    with contextlib.closing(client.stream_events(job_id, "now")) as stream:
        for event in stream:
            if isinstance(event, events.EndEvent):
                return
    raise CIError(f"the event stream of job {job_id} ended without the job's result")


def _queue_line(state: CLIState) -> QueueLine:
    from ci_client.queue_line import QueueLine, wants_color

    stream = sys.stderr
    is_tty = stream.isatty()
    environ = os.environ if state.environ is None else state.environ
    return QueueLine(stream, is_tty, wants_color(is_tty, environ))


def _write_junit(client: CIClient, job_id: str, target: Path | None, code: int) -> int:
    """Write the job's JUnit XML to target, if asked; the exit code to end with."""
    if target is None:
        return code
    from ci_common.errors import NotFound

    try:
        xml = client.get_junit(job_id)
    except NotFound as exc:
        _status(f"No JUnit XML written to {target}: {exc.message}")
        return code
    try:
        target.write_bytes(xml)
    except OSError as exc:
        _status(f"Error: could not write the JUnit XML to {target}: {exc.strerror or exc}")
        return 1
    _status(f"JUnit XML written to {target}")
    return code


def _follow(client: CIClient, job_id: str, since: Since, state: CLIState) -> int:
    """Print a job's events until it ends; the exit code for its result."""
    at_line_start = True
    queue_line = _queue_line(state)
    waiting = True  # queue positions count only until the job starts
    try:
        with contextlib.closing(client.stream_events(job_id, since)) as stream:
            for event in stream:
                if isinstance(event, events.QueueEvent):
                    if waiting:
                        queue_line.show(event.ahead)
                    continue
                queue_line.close()
                if not (isinstance(event, events.StatusEvent)
                        and event.status is JobStatus.QUEUED):
                    waiting = False
                if isinstance(event, events.OutputEvent):
                    _write_output(event.text)
                    if event.text:
                        at_line_start = event.text.endswith("\n")
                    continue
                if not at_line_start:
                    _status("")  # keep status lines off the end of an unfinished output line
                    at_line_start = True
                if isinstance(event, events.StatusEvent):
                    _status(f"Status: {event.status.value}")
                elif isinstance(event, events.EndEvent):
                    _status(render.result_line(event.end))
                    if event.end.report is not None:
                        for line in render.report_lines(event.end.report):
                            _status(line)
                    return render.exit_code_for(event.end.success)
    finally:
        queue_line.close()  # a Ctrl-C or an error starts on a line of its own
    raise CIError(f"the event stream of job {job_id} ended without the job's result")


def _cancel_after_interrupt(client: CIClient, job_id: str) -> None:
    try:
        job = client.cancel(job_id)
    except CIError as exc:
        _status(f"Error: could not cancel job {job_id}: {exc.message}")
        return
    if job.status.is_terminal and job.status is not JobStatus.CANCELLED:
        _status(f"Job {job_id} had already finished ({job.status.value}); nothing to cancel")
    else:
        _status(f"Job {job_id} cancelled")


def main() -> None:
    """Console-script entry point of `ci`."""
    # httpx's package imports its own command line (`httpx._main`: rich, pygments, click) when
    # those happen to be installed, about 0.07 s that `ci` never uses. A None entry makes that
    # import fail, which httpx expects and answers with a stub; only in this process, which
    # is ours: a library user of ci_client keeps their httpx as it is.
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    cli.main(prog_name="ci")
