"""The API served by real uvicorn, for tests that need what only a server shows: its log, a
socket a client can drop mid-request, SQLite behind it. No Docker, no controller.

- `serve_in_thread(app)`: uvicorn in a thread of this process, logging through pytest's caplog
  (for an app rigged to fail, and exact assertions on log records);
- `ServerProcess`: `uvicorn ci_server.app:app` in a subprocess over a temp SQLite database, as
  deployed, its output in a file read incrementally (`new_log()`);
- `seed_database(path)`: users with keys and jobs in every state, written before it starts.
No tests here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from ci_common.models import JobOutcome, JobStatus, OutputChunk, OutputStream, utcnow
from ci_persistence.sqlite import SqliteRepository
from tests.leases import owner_fence
from tests.unit.test_server_support import Account, add_account, project_zip

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30.0


def listening_socket() -> socket.socket:
    """A socket bound to a free loopback port, handed to uvicorn so no other test takes it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn on a free port until the block ends; yields the base URL.

    `log_config=None`: uvicorn leaves logging alone, so its records reach pytest's caplog like
    the app's own.
    """
    sock = listening_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@dataclass
class ServerProcess:
    """`uvicorn ci_server.app:app` as deployed; its stdout and stderr go to `log_path`."""

    url: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _read_to: int = field(default=0)

    @classmethod
    def start(cls, workdir: Path, env: dict[str, str]) -> ServerProcess:
        port = free_port()
        log_path = workdir / "server.log"
        argv = [sys.executable, "-m", "uvicorn", "ci_server.app:app", "--host", "127.0.0.1",
                "--port", str(port), "--no-access-log"]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        with open(log_path, "wb") as log_file:
            popen = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                     env=full_env, cwd=REPO_ROOT, start_new_session=True)
        server = cls(url=f"http://127.0.0.1:{port}", popen=popen, log_path=log_path)
        server.wait_until_healthy()
        return server

    def wait_until_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"the server exited at start:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the server did not answer /health:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def new_log(self) -> str:
        """What the server logged since the last call."""
        with open(self.log_path, "rb") as log_file:
            log_file.seek(self._read_to)
            data = log_file.read()
        self._read_to += len(data)
        return data.decode(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


@dataclass(frozen=True)
class Seed:
    """What a fresh database holds before the server starts: two users and jobs in each state."""

    alice: Account
    bob: Account
    ended_jobs: tuple[str, ...]  # alice's, finished: their event streams end by themselves
    open_jobs: tuple[str, ...]  # alice's, queued or running: their event streams stay open
    others_jobs: tuple[str, ...]  # bob's: alice gets 404 for them


def seed_database(db_path: Path) -> Seed:
    """Create the database at `db_path` with `Seed`'s users and jobs, as a controller would."""
    repo = SqliteRepository(str(db_path))
    try:
        alice = add_account(repo, "alice@example.com")
        bob = add_account(repo, "bob@example.com")
        passed = JobOutcome(status=JobStatus.COMPLETED, exit_code=0, success=True, reason=None)
        timed_out = JobOutcome(status=JobStatus.FAILED, exit_code=None, success=False,
                               reason="timed out")
        ended = [_ran(repo, alice, passed, "collected 1 item\n", "1 passed\n"),
                 _ran(repo, alice, timed_out, "sleeping\n")]
        cancelled = repo.create_job(alice.user.id, project_zip(), None)
        repo.request_cancel(cancelled.id, alice.user.id)
        ended.append(cancelled.id)
        others = [_ran(repo, bob, passed, "bob's output\n")]
        running = _ran(repo, alice, None, "still going\n")
        queued = repo.create_job(alice.user.id, project_zip(), 60.0).id
        return Seed(alice=alice, bob=bob, ended_jobs=tuple(ended),
                    open_jobs=(running, queued), others_jobs=tuple(others))
    finally:
        repo.close()


def _ran(repo: SqliteRepository, account: Account, outcome: JobOutcome | None,
         *output: str) -> str:
    """A job that ran with `output` and ended with `outcome` (None: it is still running)."""
    job_id = repo.create_job(account.user.id, project_zip(), None).id
    fence = owner_fence(repo, job_id)
    repo.mark_running(job_id, f"container-{job_id[:8]}", utcnow(), fence=fence)
    for cursor, text in enumerate(output, start=1):
        repo.append_output(job_id, [OutputChunk(OutputStream.STDOUT, text)], cursor, fence=fence)
    if outcome is not None:
        repo.finish_job(job_id, outcome, utcnow(), fence=fence)
    return job_id
