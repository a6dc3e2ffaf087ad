"""A throwaway PostgreSQL server for tests, and a fresh database per test.

The server runs from Debian's binaries (found by scripts/ensure-postgres, or CI_POSTGRES_BIN)
with a temp data directory, a free TCP port on 127.0.0.1 and a temp socket directory; it is
never assumed to be running already. PostgreSQL refuses to run as root, so as root initdb and
postgres run as the `postgres` user. Durability is switched off (fsync, synchronous commit):
the data is thrown away at the end of the session.

Fresh databases are cheap: the schema is migrated once into a template database, and each test
gets `CREATE DATABASE … TEMPLATE` of it. Anything that goes wrong raises with the server's log:
PostgreSQL tests fail loudly, they are never skipped.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60.0
TEMPLATE = "ci_template"
_SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
}


class PostgresUnavailable(RuntimeError):
    """The test server could not be set up; the message says why (with the server's log)."""


def bin_dir() -> Path:
    """The directory of initdb and postgres: CI_POSTGRES_BIN, else scripts/ensure-postgres."""
    given = os.environ.get("CI_POSTGRES_BIN")
    if given:
        missing = [name for name in ("initdb", "postgres") if not (Path(given) / name).is_file()]
        if missing:
            raise PostgresUnavailable(f"CI_POSTGRES_BIN={given} has no {' or '.join(missing)}")
        return Path(given)
    done = subprocess.run([str(ROOT / "scripts" / "ensure-postgres")], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise PostgresUnavailable(f"scripts/ensure-postgres failed ({done.returncode}): "
                                  f"{done.stderr.strip()[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def _scratch_dir() -> str | None:
    """Memory-backed /dev/shm when there is one: creating a database per test writes ~8 MB."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One postgres process and its temp directory; `stop()` removes both."""

    def __init__(self) -> None:
        self._bin = bin_dir()
        self._as_root = os.geteuid() == 0
        self._root = Path(tempfile.mkdtemp(prefix="ci-pg-", dir=_scratch_dir()))
        self._data = self._root / "data"
        self._sockets = self._root / "sockets"
        self._log = self._root / "server.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)
        self.port = 0

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> PostgresServer:
        """initdb, start postgres on a free port, wait until it answers. Raises with the log."""
        try:
            self._sockets.mkdir()
            if self._as_root:
                shutil.chown(self._root, "postgres", "postgres")
                shutil.chown(self._sockets, "postgres", "postgres")
            self._run([str(self._bin / "initdb"), "-D", str(self._data), "-U", "postgres",
                       "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"])
            self.port = free_port()
            self._launch()
            return self
        except BaseException:
            self.stop()
            raise

    def _launch(self) -> None:
        command = [str(self._bin / "postgres"), "-D", str(self._data), "-p", str(self.port),
                   "-k", str(self._sockets)]
        for name, value in _SERVER_SETTINGS.items():
            command += ["-c", f"{name}={value}"]
        with open(self._log, "ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, **self._as_postgres())
        self._wait_until_ready()

    def go_down(self) -> None:
        """Fast shutdown (every client is cut off), keeping the data and the port: fault tests."""
        process, self._process = self._process, None
        assert process is not None, "the server is not running"
        process.send_signal(2)
        process.wait(timeout=30)

    def come_back(self) -> None:
        """Start the server again after go_down(), on the same port and data. Raises with log."""
        assert self._process is None, "the server is running"
        self._launch()

    def _as_postgres(self) -> dict[str, object]:
        # PostgreSQL refuses to run as root; Popen switches user in the child, so the pid we
        # hold is postgres itself (runuser would sit in between).
        if not self._as_root:
            return {}
        return {"user": "postgres", "group": "postgres", "extra_groups": []}

    def _run(self, command: list[str]) -> None:
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              **self._as_postgres())  # type: ignore[call-overload]
        if done.returncode != 0:
            raise PostgresUnavailable(f"{' '.join(command)} failed ({done.returncode}):\n"
                                      f"{done.stdout[-2000:]}{done.stderr[-2000:]}")

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise PostgresUnavailable(f"postgres exited with {self._process.returncode}:\n"
                                          f"{self.log_tail()}")
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(f"postgres did not answer within "
                                              f"{START_TIMEOUT_S:.0f} s ({exc}):\n"
                                              f"{self.log_tail()}") from exc
            time.sleep(0.05)

    def log_tail(self) -> str:
        try:
            return self._log.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no server log)"

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then remove the data directory. Safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(2)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        shutil.rmtree(self._root, ignore_errors=True)

    # ----------------------------------------------------------------- databases
    def url(self, database: str, user: str = "postgres", password: str | None = None) -> str:
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url("postgres"), autocommit=True)

    def create_template(self) -> None:
        """Create the template database and migrate it (once per server)."""
        from ci_persistence.postgres import PostgresRepository

        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
        PostgresRepository(self.url(TEMPLATE)).close()

    def create_database(self, template: str | None = TEMPLATE) -> str:
        """A new database (a copy of the migrated template, or empty); returns its name."""
        name = f"t{next(self._names)}_{uuid.uuid4().hex[:8]}"
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
        deadline = time.monotonic() + 10
        with self.admin() as conn:
            while True:
                try:
                    conn.execute(query)
                    return name
                except psycopg.errors.ObjectInUse:
                    # A closed connection's backend may still be leaving the template.
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
