"""The product's main path, for real: `ci` → server → SQLite → controller → Docker → back, live.

Every test starts real server and controller processes on free ports against a temp database
and the real Docker engine (see harness.py).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import (
    FAILING_TEST,
    PASSING_TEST,
    SYNTAX_ERROR_TEST,
    Deployment,
    job_id_from,
    numbered_lines_in,
    numbered_lines_test,
    write_project,
)

pytestmark = pytest.mark.docker


@pytest.fixture
def running(deployment: Deployment) -> Deployment:
    deployment.start_controller()
    deployment.start_server()
    return deployment


def server(dep: Deployment, index: int = 0):  # type: ignore[no-untyped-def]
    return [p for p in dep.processes if p.name == "server"][index]


def submit(dep: Deployment, project: Path, key: str, *args: str):  # type: ignore[no-untyped-def]
    return dep.ci("submit", "test", *args, cwd=project, server=server(dep), api_key=key)


def test_passing_project_streams_output_and_exits_0(running: Deployment, tmp_path: Path) -> None:
    user = running.create_user()
    project = write_project(tmp_path / "p", {"test_ok.py": PASSING_TEST})
    result = submit(running, project, user.api_key)
    assert result.returncode == 0, result.stderr
    assert "test_ok.py::test_ok PASSED" in result.stdout
    assert "1 passed" in result.stdout
    assert "Job submitted: " in result.stderr  # status lines go to stderr
    assert "✓" in result.stderr


def test_failing_project_exits_1_with_its_test_report(running: Deployment,
                                                      tmp_path: Path) -> None:
    user = running.create_user()
    project = write_project(tmp_path / "p", {"test_bad.py": FAILING_TEST,
                                             "test_ok.py": PASSING_TEST})
    result = submit(running, project, user.api_key)
    assert result.returncode == 1
    assert "test_bad.py::test_broken FAILED" in result.stdout
    assert "assert (1 + 1) == 3" in result.stdout or "assert 2 == 3" in result.stdout
    summary = result.stderr.splitlines()[-2:]
    assert summary[0].startswith("✗ 1 failed, 1 passed in ") and summary[0].endswith(" s")
    assert summary[1] == "  tests/test_bad.py::test_broken"
    listed = json.loads(running.ci("list", "--json", server=server(running),
                                   api_key=user.api_key).stdout)
    report = listed[0]["report"]
    assert (report["passed"], report["failed"], report["failing"]) == (
        1, 1, ["tests/test_bad.py::test_broken"])
    shown = running.ci("show", listed[0]["id"], server=server(running), api_key=user.api_key)
    assert "Failing:" in shown.stdout and "tests/test_bad.py::test_broken" in shown.stdout


def test_syntax_error_project_exits_1_with_the_error_shown(
    running: Deployment, tmp_path: Path
) -> None:
    user = running.create_user()
    project = write_project(tmp_path / "p", {"test_syntax.py": SYNTAX_ERROR_TEST})
    result = submit(running, project, user.api_key)
    assert result.returncode == 1
    assert "SyntaxError" in result.stdout


def test_uninstallable_requirement_fails_with_reason_and_pip_error(
    running: Deployment, tmp_path: Path
) -> None:
    user = running.create_user()
    project = write_project(
        tmp_path / "p",
        {"test_ok.py": PASSING_TEST},
        requirements="pytest\nthis-package-does-not-exist-ci-e2e==0.0.1\n",
    )
    result = submit(running, project, user.api_key)
    assert result.returncode == 1
    assert "this-package-does-not-exist-ci-e2e" in result.stdout  # pip's own error, for the user
    assert "dependency installation failed" in result.stderr
    listed = json.loads(
        running.ci("list", "--json", server=server(running), api_key=user.api_key).stdout
    )
    assert listed[0]["status"] == "failed"
    assert listed[0]["reason"] == "dependency installation failed"
    assert listed[0]["success"] is False


def test_missing_project_files_are_named_before_upload(running: Deployment, tmp_path: Path) -> None:
    user = running.create_user()
    project = tmp_path / "p"
    (project / "src").mkdir(parents=True)
    result = submit(running, project, user.api_key)
    assert result.returncode == 2
    assert "tests" in result.stderr and "requirements.txt" in result.stderr
    assert "Traceback" not in result.stderr


def test_async_then_wait_all_then_wait_on_finished_job(running: Deployment, tmp_path: Path) -> None:
    user = running.create_user()
    project = write_project(
        tmp_path / "p", {"test_lines.py": numbered_lines_test(5, 0.05)}, capture=False
    )
    submitted = submit(running, project, user.api_key, "--async")
    assert submitted.returncode == 0, submitted.stderr
    job_id = job_id_from(submitted.stdout)

    waited = running.ci("wait", job_id, "--all", server=server(running), api_key=user.api_key)
    assert waited.returncode == 0, waited.stderr
    assert numbered_lines_in(waited.stdout) == [1, 2, 3, 4, 5]
    assert "test session starts" in waited.stdout  # --all replays from the beginning

    again = running.ci("wait", job_id, server=server(running), api_key=user.api_key)
    assert again.returncode == 0
    assert "already completed" in (again.stdout + again.stderr).lower()

    replay = running.ci("wait", job_id, "--all", server=server(running), api_key=user.api_key)
    assert numbered_lines_in(replay.stdout) == [1, 2, 3, 4, 5]


def test_list_table_and_json(running: Deployment, tmp_path: Path) -> None:
    user = running.create_user()
    passing = write_project(tmp_path / "ok", {"test_ok.py": PASSING_TEST})
    failing = write_project(tmp_path / "bad", {"test_bad.py": FAILING_TEST})
    assert submit(running, passing, user.api_key).returncode == 0
    assert submit(running, failing, user.api_key).returncode == 1

    table = running.ci("list", server=server(running), api_key=user.api_key)
    assert table.returncode == 0
    header = table.stdout.splitlines()[0].split()
    assert header == ["JOB", "ID", "STATUS", "START", "TIME", "END", "TIME", "SUCCESS", "TESTS"]
    rows = table.stdout.splitlines()[2:]
    assert len(rows) == 2
    assert "✗" in rows[0] and "✓" in rows[1]  # newest first

    listed = json.loads(
        running.ci("list", "--json", server=server(running), api_key=user.api_key).stdout
    )
    assert [job["success"] for job in listed] == [False, True]
    assert set(listed[0]) >= {
        "id",
        "status",
        "success",
        "exit_code",
        "reason",
        "created_at",
        "start_time",
        "end_time",
    }
    assert listed[0]["status"] == "completed" and listed[0]["exit_code"] == 1


def test_jobs_and_logs_survive_a_server_restart(running: Deployment, tmp_path: Path) -> None:
    user = running.create_user()
    project = write_project(
        tmp_path / "p", {"test_lines.py": numbered_lines_test(3)}, capture=False
    )
    assert submit(running, project, user.api_key).returncode == 0
    old = server(running)
    old.terminate()
    new = running.start_server()
    listed = json.loads(running.ci("list", "--json", server=new, api_key=user.api_key).stdout)
    assert len(listed) == 1 and listed[0]["success"] is True
    replay = running.ci("wait", listed[0]["id"], "--all", server=new, api_key=user.api_key)
    assert numbered_lines_in(replay.stdout) == [1, 2, 3]


def test_two_users_are_isolated_on_every_endpoint(running: Deployment, tmp_path: Path) -> None:
    alice, bob = running.create_user(), running.create_user()
    project = write_project(tmp_path / "p", {"test_ok.py": PASSING_TEST})
    job_id = job_id_from(submit(running, project, alice.api_key, "--async").stdout)
    base = server(running).url
    bob_headers = {"Authorization": f"Bearer {bob.api_key}"}
    missing = "00000000-0000-0000-0000-000000000000"
    for method, path in [
        ("GET", f"/jobs/{job_id}"),
        ("GET", f"/jobs/{job_id}/events"),
        ("GET", f"/jobs/{job_id}/log"),
        ("POST", f"/jobs/{job_id}/cancel"),
    ]:
        theirs = httpx.request(method, base + path, headers=bob_headers, timeout=10)
        absent = httpx.request(
            method, base + path.replace(job_id, missing), headers=bob_headers, timeout=10
        )
        assert theirs.status_code == absent.status_code == 404, path
        assert theirs.json()["detail"] == absent.json()["detail"].replace(missing, job_id)
    assert httpx.get(base + "/jobs", headers=bob_headers, timeout=10).json()["jobs"] == []
    bob_list = running.ci("list", "--json", server=server(running), api_key=bob.api_key)
    assert json.loads(bob_list.stdout) == []
    bob_wait = running.ci("wait", job_id, server=server(running), api_key=bob.api_key)
    assert bob_wait.returncode == 1 and "not found" in bob_wait.stderr
    alice_wait = running.ci("wait", job_id, "--all", server=server(running), api_key=alice.api_key)
    assert alice_wait.returncode == 0


def test_two_replicas_share_jobs(running: Deployment, tmp_path: Path) -> None:
    second = running.start_server()
    user = running.create_user()
    project = write_project(
        tmp_path / "p", {"test_lines.py": numbered_lines_test(20, 0.05)}, capture=False
    )
    job_id = job_id_from(submit(running, project, user.api_key, "--async").stdout)
    waited = running.ci("wait", job_id, "--all", server=second, api_key=user.api_key)
    assert waited.returncode == 0, waited.stderr
    assert numbered_lines_in(waited.stdout) == list(range(1, 21))


def test_numbered_lines_arrive_exactly_once_in_order(running: Deployment, tmp_path: Path) -> None:
    user = running.create_user()
    project = write_project(
        tmp_path / "p", {"test_lines.py": numbered_lines_test(2000)}, capture=False
    )
    result = submit(running, project, user.api_key)
    assert result.returncode == 0, result.stderr
    assert numbered_lines_in(result.stdout) == list(range(1, 2001))


def test_ctrl_c_during_submit_cancels_the_job(running: Deployment, tmp_path: Path) -> None:
    user = running.create_user()
    project = write_project(
        tmp_path / "p", {"test_lines.py": numbered_lines_test(600, 0.1)}, capture=False
    )
    proc = running.ci_popen(
        "submit", "test", cwd=project, server=server(running), api_key=user.api_key
    )
    wait_for_line(proc, "line 3")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "cancelled" in err.lower() and "Traceback" not in err
    listed = wait_for_status(running, user.api_key, {"cancelled"})
    assert listed["status"] == "cancelled"
    deadline = time.monotonic() + 30
    while running.containers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running.containers() == []  # the cancelled job's container is removed


def test_logs_show_and_cancel_of_a_running_job(running: Deployment, tmp_path: Path) -> None:
    user = running.create_user()
    project = write_project(
        tmp_path / "p", {"test_lines.py": numbered_lines_test(600, 0.1)}, capture=False
    )
    job_id = job_id_from(submit(running, project, user.api_key, "--async").stdout)
    proc = running.ci_popen("wait", job_id, "--all", server=server(running), api_key=user.api_key)
    wait_for_line(proc, "line 5")
    logs = running.ci("logs", job_id, server=server(running), api_key=user.api_key)
    assert logs.returncode == 0, logs.stderr  # returns at once: the job runs on
    printed = numbered_lines_in(logs.stdout)
    assert printed[:5] == [1, 2, 3, 4, 5] and printed == list(range(1, len(printed) + 1))
    tail = running.ci("logs", job_id, "--tail", "1", server=server(running), api_key=user.api_key)
    assert len(tail.stdout.splitlines()) == 1

    cancelled = running.ci("cancel", job_id, server=server(running), api_key=user.api_key)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stderr.splitlines()[-1] == f"Job {job_id} cancelled"
    out, err = proc.communicate(timeout=60)  # the watcher sees the end too
    assert proc.returncode == 1 and "✗ Job cancelled" in err
    shown = running.ci("show", job_id, server=server(running), api_key=user.api_key)
    assert "Status:" in shown.stdout and "cancelled" in shown.stdout
    again = running.ci("cancel", job_id, server=server(running), api_key=user.api_key)
    assert again.returncode == 0 and "cancelled" in again.stderr
    deadline = time.monotonic() + 30
    while running.containers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running.containers() == []


def test_ctrl_c_during_wait_leaves_the_job_running(running: Deployment, tmp_path: Path) -> None:
    user = running.create_user()
    project = write_project(
        tmp_path / "p", {"test_lines.py": numbered_lines_test(40, 0.1)}, capture=False
    )
    job_id = job_id_from(submit(running, project, user.api_key, "--async").stdout)
    proc = running.ci_popen("wait", job_id, "--all", server=server(running), api_key=user.api_key)
    wait_for_line(proc, "line 2")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert f"ci wait {job_id}" in err and "Traceback" not in err
    finished = running.ci("wait", job_id, "--all", server=server(running), api_key=user.api_key)
    assert finished.returncode == 0
    assert numbered_lines_in(finished.stdout) == list(range(1, 41))


def test_stream_drop_mid_job_resumes_without_loss_or_duplicates(
    running: Deployment, tmp_path: Path
) -> None:
    """The replica the client streams from dies; it comes back on the same port."""
    user = running.create_user()
    project = write_project(
        tmp_path / "p", {"test_lines.py": numbered_lines_test(60, 0.05)}, capture=False
    )
    first = server(running)
    port = int(first.url.rsplit(":", 1)[1])
    job_id = job_id_from(submit(running, project, user.api_key, "--async").stdout)
    proc = running.ci_popen("wait", job_id, "--all", server=first, api_key=user.api_key)
    before_drop = wait_for_line(proc, "line 5")
    first.kill9()
    time.sleep(0.5)
    running.start_server(port=port)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert numbered_lines_in(before_drop + out) == list(range(1, 61))


# -------------------------------------------------------------------------- helpers
def wait_for_line(proc, needle: str, timeout: float = 90) -> str:  # type: ignore[no-untyped-def]
    """Read the process's stdout until a line contains needle; return what was read."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(
                f"stream ended before {needle!r}: {''.join(seen)}{proc.stderr.read()}"
            )
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"timed out waiting for {needle!r}")


def wait_for_status(dep: Deployment, key: str, statuses: set[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = json.loads(dep.ci("list", "--json", server=server(dep), api_key=key).stdout)
        if listed and listed[0]["status"] in statuses:
            return listed[0]
        time.sleep(0.3)
    raise AssertionError(f"job never reached {statuses}")
