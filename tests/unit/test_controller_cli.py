"""`ci-controller` as a process: options, one-line errors, engine down, warm stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ci_common.errors import RuntimeUnavailable
from ci_controller.docker_runtime import DockerRuntime
from tests.postgres import free_port

NO_ENGINE = "unix:///nonexistent/ci-test-docker.sock"


def controller_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CI_")}
    env.update(DOCKER_HOST=NO_ENGINE, CI_CONTROLLER_ID=f"cli-test-{os.getpid()}",
               CI_CONTAINER_PREFIX="cli_test_")
    return env


def test_help_lists_the_options(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "ci_controller", "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for option in ("--db-path", "--database-url", "--interval", "--max-jobs", "--debug"):
        assert option in result.stdout


def test_unwritable_database_is_one_error_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ci_controller", "--db-path", "/nonexistent/dir/ci.db"],
        capture_output=True, text=True, timeout=30, env=controller_env(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("Error: cannot open the database /nonexistent/dir/ci.db")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("how", ["option", "environment"])
def test_unreachable_postgresql_is_one_line_with_the_url_but_not_the_password(
        tmp_path: Path, how: str) -> None:
    port = free_port()
    url = f"postgresql://ci:hunter2-pw@127.0.0.1:{port}/ci"
    env = controller_env(tmp_path)
    args = [sys.executable, "-m", "ci_controller", "--db-path", str(tmp_path / "ci.db")]
    if how == "option":
        args += ["--database-url", url]
    else:
        env["CI_DATABASE_URL"] = url  # wins over --db-path
    result = subprocess.run(args, capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: cannot reach PostgreSQL at postgresql://ci@127.0.0.1:{port}/ci")
    assert "hunter2" not in result.stderr + result.stdout
    assert not (tmp_path / "ci.db").exists()


def test_bad_setting_is_a_usage_error(tmp_path: Path) -> None:
    env = controller_env(tmp_path) | {"CI_MAX_CONCURRENT_JOBS": "many"}
    result = subprocess.run([sys.executable, "-m", "ci_controller", "--db-path",
                             str(tmp_path / "ci.db")],
                            capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Error: CI_MAX_CONCURRENT_JOBS='many' is not valid for max_concurrent_jobs"]


def test_engine_down_then_sigterm_is_a_clean_warm_stop(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ci_controller", "--db-path", str(tmp_path / "ci.db"),
         "--interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=controller_env(tmp_path))
    try:
        # The signal handler exists once it runs (a loaded machine takes a while to import).
        assert proc.stderr is not None
        started = [proc.stderr.readline()]
        while "running up to" not in started[-1]:
            assert started[-1], "the controller exited before it started"
            started.append(proc.stderr.readline())
        time.sleep(1.5)  # several retry windows' worth of reconcile loops
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=15)
        stderr = "".join(started) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    # one line per retry window (0.1 s, 0.2 s, 0.4 s...), never one per 20 ms loop
    assert 1 <= len(errors) <= 5, stderr
    assert all("container engine unavailable" in line for line in errors)
    assert "SIGTERM received: warm stop" in stderr
    assert "Traceback" not in stderr


def test_runtime_reports_an_engine_that_does_not_answer() -> None:
    runtime = DockerRuntime(base_url=NO_ENGINE)
    with pytest.raises(RuntimeUnavailable):
        runtime.list({"ci.controller_id": "x"})
    with pytest.raises(RuntimeUnavailable):
        runtime.inspect("abc")
