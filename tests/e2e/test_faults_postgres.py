"""PostgreSQL going away under running services, for real.

A deployment on its own throwaway PostgreSQL server runs a job that prints numbered lines while
the server is shut down (fast: every client is cut off) and started again on the same port and
data. Every service must ride it out by itself: the server answers 503 while the database is
away, the controller keeps the job's output and stores it once the database is back, and the
`ci` CLI (reconnecting its event stream with Last-Event-ID) shows every line once, in order.
The URL carries a password (the server trusts everyone, so it is never checked): it must show
up in no log and no error.

A replica whose LISTEN connection is cut (pg_terminate_backend) must notice and catch up from
the database: a watcher still gets every line.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.e2e.harness import (
    PASSING_TEST,
    Deployment,
    LineReader,
    Process,
    numbered_lines_in,
    numbered_lines_test,
    remove_labelled_containers,
    remove_volumes,
    submit_async,
    write_project,
)
from tests.postgres import PostgresServer

pytestmark = pytest.mark.docker

PASSWORD = "pg-secret-7d1f"
JOB_LINES = 60  # 0.1 s apart: the job prints all through the outage
DOWN_S = 3.0


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own, so taking it down disturbs no other test."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def outage_deployment(tmp_path: Path, runner_image: str, ca_bundle: str | None,
                      own_postgres: PostgresServer) -> Iterator[Deployment]:
    # An empty database: the services migrate it themselves, as in production.
    database = own_postgres.create_database(template=None)
    dep = Deployment(workdir=tmp_path, runner_image=runner_image, ca_bundle=ca_bundle,
                     database_url=own_postgres.url(database, password=PASSWORD))
    label = dep.label()  # asked now: close() cannot ask a database that is down
    try:
        yield dep
    finally:
        for process in reversed(dep.processes):
            process.kill9()
        remove_labelled_containers(label)
        remove_volumes(label, dep.container_prefix)


def status_while_down(url: str, key: str) -> list[int]:
    """What the server answers to an API read and to /health while the database is away."""
    headers = {"Authorization": f"Bearer {key}"}
    return [httpx.get(f"{url}/jobs", headers=headers, timeout=60).status_code,
            httpx.get(f"{url}/health", timeout=60).status_code]


def assert_quiet(processes: list[Process]) -> None:
    """Every service still runs, logged no traceback and never the password."""
    for process in processes:
        assert process.popen.poll() is None, f"{process.name} exited:\n{process.log()}"
        log = process.log()
        assert "Traceback" not in log, log
        assert PASSWORD not in log, log


def test_postgres_restart_mid_job_loses_and_doubles_nothing(
    outage_deployment: Deployment, own_postgres: PostgresServer, tmp_path: Path
) -> None:
    dep = outage_deployment
    server = dep.start_server()
    controller = dep.start_controller()
    user = dep.create_user()
    project = write_project(tmp_path / "lines",
                            {"test_lines.py": numbered_lines_test(JOB_LINES, 0.1)},
                            capture=False)
    job = submit_async(dep, server, project, user.api_key)
    stream = LineReader(dep.ci_popen("wait", job, "--all", server=server, api_key=user.api_key))
    try:
        stream.wait_for("line 5")

        own_postgres.go_down()
        down_at = time.monotonic()
        statuses = status_while_down(str(server.url), user.api_key)
        answered_in_s = time.monotonic() - down_at
        time.sleep(max(down_at + DOWN_S - time.monotonic(), 0))
        own_postgres.come_back()

        out, err, code = stream.finish(timeout=180)
    finally:
        if stream.popen.poll() is None:
            stream.popen.kill()
    # Down: the API says so with 503, never 500; /health touches no database.
    assert statuses == [503, 200], statuses
    assert answered_in_s < 15, answered_in_s  # at once, not after the pool's 30 s wait
    assert code == 0, err
    assert numbered_lines_in(out) == list(range(1, JOB_LINES + 1)), out
    assert PASSWORD not in out + err

    # What the database kept: every line once, in order, and the right end.
    replay = dep.ci("wait", job, "--all", server=server, api_key=user.api_key)
    assert replay.returncode == 0, replay.stderr
    assert numbered_lines_in(replay.stdout) == list(range(1, JOB_LINES + 1))
    view = httpx.get(f"{server.url}/jobs/{job}",
                     headers={"Authorization": f"Bearer {user.api_key}"}, timeout=30).json()
    assert (view["status"], view["exit_code"]) == ("completed", 0), view

    # The services took new work after the outage too.
    after = submit_async(dep, server, write_project(tmp_path / "ok", {"test_ok.py": PASSING_TEST}),
                         user.api_key)
    waited = dep.ci("wait", after, server=server, api_key=user.api_key)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert_quiet([server, controller])
    assert "storing output failed" in controller.log()  # it really met the outage


def listener_pids(admin_url: str, database: str) -> list[int]:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s "
                            "AND query ILIKE 'LISTEN%%'", (database,)).fetchall()
    return [int(row[0]) for row in rows]


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_replica_whose_listen_connection_drops_catches_up(
    deployment: Deployment, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    dep = deployment
    assert dep.database_url is not None
    database = dep.database_url.rsplit("/", 1)[1]
    server = dep.start_server()
    controller = dep.start_controller()
    user = dep.create_user()
    project = write_project(tmp_path / "lines", {"test_lines.py": numbered_lines_test(30, 0.1)},
                            capture=False)
    job = submit_async(dep, server, project, user.api_key)
    watcher = LineReader(dep.ci_popen("wait", job, "--all", server=server, api_key=user.api_key))
    try:
        watcher.wait_for("line 3")
        pids = listener_pids(postgres_server.url("postgres"), database)
        assert pids, "no LISTEN connection found"
        with psycopg.connect(postgres_server.url("postgres"), autocommit=True) as conn:
            for pid in pids:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        cut_at = len(watcher.lines)
        out, err, code = watcher.finish(timeout=120)
    finally:
        if watcher.popen.poll() is None:
            watcher.popen.kill()
    assert code == 0, err
    assert numbered_lines_in(out) == list(range(1, 31))
    assert len(watcher.lines) > cut_at  # lines did arrive after the cut
    assert listener_pids(postgres_server.url("postgres"), database)  # listening anew
    assert_quiet([server, controller])
