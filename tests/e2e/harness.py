"""Real deployments for end-to-end tests: server and controller processes on free ports.

Each `Deployment` owns a database (so its own installation id): a temp SQLite file, or, with
`database_url`, a fresh PostgreSQL database on the test session's throwaway server. It owns a
container prefix and the processes it started; `close()` kills them and removes every container
labelled with its installation id, so tests running in parallel (pytest -n auto) never see each
other's jobs.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import docker
import httpx
import pytest

from ci_common.repository import Repository
from ci_persistence.sqlite import SqliteRepository

REPO_ROOT = Path(__file__).resolve().parents[2]
KEY_PATTERN = re.compile(r"ci_[A-Za-z0-9_-]{32,}")
BACKENDS = ("sqlite", "postgres")
# The e2e tests that matter for a shared database run on both; the `deployment` fixture reads
# the `backend` parameter (tests/e2e/conftest.py).
on_both_backends = pytest.mark.parametrize("backend", BACKENDS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Process:
    """A service process and the file its output goes to."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill9()


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    labels: dict[str, str]
    state: str  # created, running, exited, ...


@dataclass
class User:
    email: str
    api_key: str


@dataclass
class Deployment:
    """One isolated CI deployment: a database, controllers and server replicas."""

    workdir: Path
    runner_image: str
    ca_bundle: str | None
    extra_env: dict[str, str] = field(default_factory=dict)
    database_url: str | None = None  # PostgreSQL instead of the SQLite file at db_path
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    processes: list[Process] = field(default_factory=list)
    _pg_installation: str | None = field(default=None, init=False, repr=False)

    @property
    def db_path(self) -> Path:
        return self.workdir / "ci_jobs.db"

    @property
    def controller_id(self) -> str:
        return self.extra_env.get("CI_CONTROLLER_ID", f"test-{self.run_id}")

    @property
    def backend(self) -> str:
        return "postgres" if self.database_url else "sqlite"

    def open_repository(self) -> Repository:
        """The deployment's database as a repository, as a service opens it (caller closes)."""
        if self.database_url:
            from ci_persistence.postgres import PostgresRepository

            return PostgresRepository(self.database_url)
        return SqliteRepository(str(self.db_path))

    def installation_id(self) -> str:
        """The id the database was given at creation (the database is made now if need be)."""
        if self.database_url:
            if self._pg_installation is None:  # asked at every container listing: ask once
                repository = self.open_repository()
                try:
                    self._pg_installation = repository.installation_id()
                finally:
                    repository.close()
            return self._pg_installation
        if not self.db_path.exists():
            SqliteRepository(str(self.db_path)).close()
        conn = sqlite3.connect(self.db_path)
        try:
            row = conn.execute("SELECT id FROM installation").fetchone()
        finally:
            conn.close()
        return str(row[0])

    def label(self) -> str:
        """The label that selects this deployment's containers, and no other deployment's.

        The installation id, never the controller id: deployments may share controller ids
        (two installations on one engine do, by default).
        """
        return f"ci.installation_id={self.installation_id()}"

    @property
    def container_prefix(self) -> str:
        return f"ci_test_{self.run_id}_"

    def env(self, **overrides: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CI_DB_PATH=str(self.db_path),
            CI_RUNNER_IMAGE=self.runner_image,
            CI_CONTROLLER_ID=self.controller_id,
            CI_CONTAINER_PREFIX=self.container_prefix,
            CI_RECONCILE_INTERVAL="1.0",
            PYTHONUNBUFFERED="1",
        )
        if self.ca_bundle:
            env["CI_CA_BUNDLE"] = self.ca_bundle
        env.pop("CI_DATABASE_URL", None)
        if self.database_url:
            env["CI_DATABASE_URL"] = self.database_url  # wins over CI_DB_PATH
        env.pop("CI_API_KEY", None)
        env.pop("CI_SERVER_URL", None)
        env.update(self.extra_env)
        env.update(overrides)
        return env

    # ------------------------------------------------------------------ services
    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Process:
        log_path = self.workdir / f"{name}-{len(self.processes)}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - the child keeps it open
        popen = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                 cwd=self.workdir, start_new_session=True)
        log_file.close()
        process = Process(name=name, popen=popen, log_path=log_path)
        self.processes.append(process)
        return process

    def start_server(self, port: int | None = None, **env: str) -> Process:
        port = port or free_port()
        argv = [sys.executable, "-m", "uvicorn", "ci_server.app:app", "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning"]
        process = self._spawn("server", argv, self.env(**env))
        process.url = f"http://127.0.0.1:{port}"
        wait_for_health(process)
        return process

    def start_controller(self, **env: str) -> Process:
        process = self._spawn("controller", [sys.executable, "-m", "ci_controller"],
                              self.env(**env))
        time.sleep(0.3)
        if process.popen.poll() is not None:
            raise RuntimeError(f"controller exited at start:\n{process.log()}")
        return process

    # ------------------------------------------------------------------ CLIs
    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "ci_admin", *args], env=self.env(),
                                capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"ci-admin {args} failed: {result.stderr}")
        return result

    def create_user(self, email: str | None = None) -> User:
        email = email or f"user-{uuid.uuid4().hex[:8]}@example.com"
        self.admin("user", "create", "--name", email.split("@")[0], "--email", email)
        out = self.admin("key", "create", "--email", email, "--name", "test").stdout
        match = KEY_PATTERN.search(out)
        assert match, out
        return User(email=email, api_key=match.group(0))

    def ci_argv(self, *args: str, server: str | Process | None = None,
                api_key: str | None = None) -> list[str]:
        argv = [sys.executable, "-c", "from ci_client.cli import main; main()"]
        if server is not None:
            argv += ["--server", str(server.url) if isinstance(server, Process) else server]
        if api_key is not None:
            argv += ["--api-key", api_key]
        return argv + list(args)

    def ci(self, *args: str, cwd: Path | None = None, server: str | Process | None = None,
           api_key: str | None = None, timeout: float = 180,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `ci` to completion and return its result (stdout, stderr, returncode)."""
        return subprocess.run(self.ci_argv(*args, server=server, api_key=api_key),
                              cwd=cwd or self.workdir, env={**self.env(), **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def ci_popen(self, *args: str, cwd: Path | None = None, server: str | Process | None = None,
                 api_key: str | None = None) -> subprocess.Popen[str]:
        """Start `ci` in the background (for Ctrl-C tests and live streams)."""
        return subprocess.Popen(self.ci_argv(*args, server=server, api_key=api_key),
                                cwd=cwd or self.workdir, env=self.env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    # ------------------------------------------------------------------ teardown
    def containers(self) -> list[ContainerInfo]:
        """Containers of this deployment (its installation label), in any state.

        One low-level listing: the SDK's `containers.list` inspects each container afterwards
        and fails when the controller removes one in between.
        """
        client = docker.from_env()
        try:
            rows = client.api.containers(
                all=True, filters={"label": self.label()})
        finally:
            client.close()
        return [ContainerInfo(id=row["Id"], labels=row.get("Labels") or {},
                              state=row.get("State", "")) for row in rows]

    def close(self) -> None:
        for process in reversed(self.processes):
            process.kill9()
        remove_labelled_containers(self.label())
        remove_volumes(self.label(), self.container_prefix)


def remove_labelled_containers(label: str, timeout: float = 30) -> None:
    """Remove every container with the label, tolerating removals already under way."""
    client = docker.from_env()
    deadline = time.monotonic() + timeout
    try:
        while True:
            # The low-level listing: containers.list() inspects each container afterwards and
            # fails when the controller removes one in between.
            rows = client.api.containers(all=True, filters={"label": label})
            if not rows:
                return
            for row in rows:
                try:
                    client.api.remove_container(row["Id"], force=True)
                except docker.errors.NotFound:
                    pass
                except docker.errors.APIError as exc:
                    if exc.status_code != 409:  # 409: a removal is already in progress
                        raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"containers labelled {label} were not removed in time")
            time.sleep(0.1)
    finally:
        client.close()


def remove_volumes(label: str, name_prefix: str) -> None:
    """Remove the volumes with the label (cached environments), or whose name starts with
    name_prefix (one Docker made anew for a mount after its volume was removed)."""
    client = docker.from_env()
    try:
        listed = [(client.api.volumes(filters=f) or {}).get("Volumes") or []
                  for f in ({"label": label}, {"name": name_prefix})]
        for volume in {v["Name"] for found in listed for v in found}:
            if volume.startswith(name_prefix) or any(volume == v["Name"] for v in listed[0]):
                with contextlib.suppress(docker.errors.NotFound):
                    client.api.remove_volume(volume, force=True)
    finally:
        client.close()


def wait_for_health(process: Process, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited at start:\n{process.log()}")
        try:
            if httpx.get(f"{process.url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{process.name} did not become healthy:\n{process.log()}")


# ---------------------------------------------------------------------- projects
def write_project(root: Path, tests: dict[str, str], requirements: str = "pytest\n",
                  src: dict[str, str] | None = None, capture: bool = True) -> Path:
    """Write a project (src/, tests/, requirements.txt) and return its root.

    capture=False adds a pytest.ini with `-s`, as a user does who wants the prints of passing
    tests streamed live (pytest captures them by default and shows them only on failure).
    """
    (root / "src").mkdir(parents=True, exist_ok=True)
    (root / "tests").mkdir(parents=True, exist_ok=True)
    (root / "requirements.txt").write_text(requirements)
    if not capture:
        (root / "pytest.ini").write_text("[pytest]\naddopts = -s\n")
    for name, text in (src or {"app.py": "VALUE = 1\n"}).items():
        (root / "src" / name).write_text(text)
    for name, text in tests.items():
        (root / "tests" / name).write_text(text)
    return root


def zip_project(root: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(root).as_posix())
    return buffer.getvalue()


PASSING_TEST = "def test_ok():\n    assert 1 + 1 == 2\n"
FAILING_TEST = "def test_broken():\n    assert 1 + 1 == 3\n"
SYNTAX_ERROR_TEST = "def test_broken(:\n    pass\n"


def numbered_lines_test(count: int, delay_s: float = 0.0) -> str:
    """A test printing `line 1` … `line N` (with a pause between lines, to be mid-job)."""
    return (
        "import sys, time\n"
        "def test_lines():\n"
        "    print()  # with -s, pytest's own 'test_lines.py::test_lines ' shares the first line\n"
        f"    for i in range(1, {count} + 1):\n"
        "        print(f'line {i}', flush=True)\n"
        f"        time.sleep({delay_s})\n"
    )


def numbered_lines_in(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^line (\d+)$", text, flags=re.MULTILINE)]


# ---------------------------------------------------------------------- live output
class LineReader:
    """Reads a process's stdout on a thread, so a test can wait for a line with a deadline.

    `lines` holds what was read so far, `arrivals` when each line arrived (monotonic).
    """

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self.lines: list[str] = []
        self.arrivals: list[float] = []
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def _take(self, line: str) -> None:
        self.lines.append(line)
        self.arrivals.append(time.monotonic())

    def wait_for(self, needle: str, timeout: float = 90) -> float:
        """Block until a line containing needle was read; when it arrived. Fails, never hangs."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            for index in range(checked, len(self.lines)):
                if needle in self.lines[index]:
                    return self.arrivals[index]
            checked = len(self.lines)
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {needle!r} in time; read: {self.text()!r}") from None
            if line is None:
                self._queue.put(None)  # later waits see the end too
                raise AssertionError(f"output ended before {needle!r}: {self.text()!r}")
            self._take(line)

    def finish(self, timeout: float = 120) -> tuple[str, str, int]:
        """Wait for the process to exit; its whole stdout, its stderr and its exit code."""
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise
        while (line := self._queue.get(timeout=10)) is not None:
            self._take(line)
        self._queue.put(None)
        assert self.popen.stderr is not None
        return self.text(), self.popen.stderr.read(), self.popen.returncode

    def text(self) -> str:
        return "".join(self.lines)


def job_id_from(text: str) -> str:
    """The id in `ci submit test`'s "Job submitted: <id>" line."""
    match = re.search(r"Job submitted: (\S+)", text)
    assert match, f"no job id in: {text!r}"
    return match.group(1)


def submit_async(dep: Deployment, server: Process | str, project: Path, key: str) -> str:
    """`ci submit test --async` in project; the new job's id."""
    result = dep.ci("submit", "test", "--async", cwd=project, server=server, api_key=key)
    assert result.returncode == 0, result.stderr
    return job_id_from(result.stdout)
