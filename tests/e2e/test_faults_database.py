"""The database file briefly locked by another process, for real.

A separate Python process opens the SQLite file and holds `BEGIN EXCLUSIVE` for a few seconds
while the `ci` CLI, an SSE stream, `ci-admin` and a controller writing a job's output all need
the database: every one of them must wait and succeed, and "database is locked" must surface
nowhere.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import (
    PASSING_TEST,
    Deployment,
    LineReader,
    job_id_from,
    numbered_lines_in,
    numbered_lines_test,
    submit_async,
    write_project,
    zip_project,
)

pytestmark = pytest.mark.docker

LOCK_S = 3.0
JOB_LINES = 120  # 0.05 s apart: the job prints all through the lock
LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
print("released", flush=True)
"""
LOCK_ERRORS = re.compile(r"database is locked|database is busy|Traceback", re.IGNORECASE)


@pytest.fixture
def spawned(deployment: Deployment) -> Iterator[list[subprocess.Popen[str]]]:
    """Processes the test starts (locker, CLIs); killed at the end whatever happened."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def hold_lock(dep: Deployment, started: list[subprocess.Popen[str]]) -> LineReader:
    """Start a process holding BEGIN EXCLUSIVE on the database for LOCK_S; returns once held."""
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(dep.db_path), str(LOCK_S)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started.append(proc)
    reader = LineReader(proc)
    reader.wait_for("locked", timeout=30)
    return reader


def timed_request(results: dict[str, tuple[httpx.Response, float]], name: str, method: str,
                  url: str, key: str, **kwargs: object) -> threading.Thread:
    """Send one HTTP request on a thread; results[name] = (response, seconds it took)."""

    def send() -> None:
        began = time.monotonic()
        response = httpx.request(method, url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=60, **kwargs)  # type: ignore[arg-type]
        results[name] = (response, time.monotonic() - began)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_locked_database_makes_everyone_wait_and_succeed(
    deployment: Deployment, spawned: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    dep = deployment
    server = dep.start_server()
    controller = dep.start_controller()
    user = dep.create_user()
    lines_project = write_project(
        tmp_path / "lines", {"test_lines.py": numbered_lines_test(JOB_LINES, 0.05)},
        capture=False)
    passing_project = write_project(tmp_path / "ok", {"test_ok.py": PASSING_TEST})
    archive = zip_project(passing_project)

    job = submit_async(dep, server, lines_project, user.api_key)
    stream = LineReader(dep.ci_popen("wait", job, "--all", server=server, api_key=user.api_key))
    spawned.append(stream.popen)
    stream.wait_for("line 3")

    # ------------------------------------------------------------------ the lock is held
    lock = hold_lock(dep, spawned)
    locked_at = time.monotonic()
    results: dict[str, tuple[httpx.Response, float]] = {}
    requests = [
        timed_request(results, "submit", "POST", f"{server.url}/jobs", user.api_key,
                      files={"archive": ("p.zip", archive, "application/zip")}),
        timed_request(results, "list", "GET", f"{server.url}/jobs", user.api_key),
        timed_request(results, "get", "GET", f"{server.url}/jobs/{job}", user.api_key),
    ]
    clis = {
        "ci submit": dep.ci_popen("submit", "test", "--async", cwd=passing_project,
                                  server=server, api_key=user.api_key),
        "ci list": dep.ci_popen("list", "--json", server=server, api_key=user.api_key),
        "ci wait": dep.ci_popen("wait", job, "--all", server=server, api_key=user.api_key),
    }
    admins = {
        "ci-admin user create": admin_popen(dep, "user", "create", "--name", "locked",
                                            "--email", "locked@example.com"),
        "ci-admin user list": admin_popen(dep, "user", "list", "--json"),
    }
    spawned.extend([*clis.values(), *admins.values()])
    time.sleep(max(locked_at + LOCK_S - 0.5 - time.monotonic(), 0))
    # Writers cannot have finished while the lock is held: they are waiting on it.
    assert clis["ci submit"].poll() is None and admins["ci-admin user create"].poll() is None
    released_at = lock.wait_for("released", timeout=LOCK_S + 30)
    assert released_at - locked_at >= LOCK_S - 0.5  # it really was held that long

    for thread in requests:
        thread.join(60)
    assert {name: response.status_code for name, (response, _) in results.items()} == {
        "submit": 201, "list": 200, "get": 200}, {n: r.text for n, (r, _) in results.items()}
    # The submission was in flight while the lock was held: it waited for it, then succeeded.
    assert results["submit"][1] >= LOCK_S - 1.0, results

    outputs: dict[str, tuple[str, str]] = {}
    for name, proc in {**clis, **admins}.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name} exited {proc.returncode}: {err}"
        assert not LOCK_ERRORS.search(out + err), f"{name}: {out}{err}"
        outputs[name] = (out, err)
    submitted = [job_id_from(outputs["ci submit"][0]), results["submit"][0].json()["id"]]
    assert json.loads(outputs["ci list"][0])[-1]["id"] == job
    assert isinstance(json.loads(outputs["ci-admin user list"][0]), list)
    assert "locked@example.com" in dep.admin("user", "list").stdout

    # ------------------------------------------------------------------ afterwards
    out, err, code = stream.finish()
    assert code == 0, err
    assert numbered_lines_in(out) == list(range(1, JOB_LINES + 1))  # the live stream
    assert numbered_lines_in(outputs["ci wait"][0]) == list(range(1, JOB_LINES + 1))
    replay = dep.ci("wait", job, "--all", server=server, api_key=user.api_key)
    assert replay.returncode == 0, replay.stderr
    assert numbered_lines_in(replay.stdout) == list(range(1, JOB_LINES + 1))
    for job_id in submitted:
        waited = dep.ci("wait", job_id, server=server, api_key=user.api_key)
        assert waited.returncode == 0, waited.stderr
    for process in (server, controller):
        assert not LOCK_ERRORS.search(process.log()), process.log()
    assert "storing output failed" not in controller.log()
    assert "reconcile failed" not in controller.log()


def admin_popen(dep: Deployment, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "ci_admin", *args], env=dep.env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
