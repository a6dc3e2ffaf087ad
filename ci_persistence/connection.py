"""SQLite connections shared safely by many threads and many processes.

One connection per thread (sqlite3 connections are not meant to be shared), autocommit mode
(`isolation_level=None`) with explicit transactions, WAL so readers never block the writer, and
`BEGIN IMMEDIATE` for every writing transaction: a deferred transaction that reads and then
writes fails at once with SQLITE_BUSY instead of waiting, which is the classic source of
"database is locked" with several processes.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

from ci_persistence.file_watch import FileWatch
from ci_persistence.waiting import SAFETY_RECHECK_S, ChangeSignal

T = TypeVar("T")

_BUSY_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
_FIRST_BACKOFF_S = 0.002
_MAX_BACKOFF_S = 0.05
# Where inotify is missing (not Linux, or out of watches) waiters look this often instead.
NO_WATCH_RECHECK_S = 0.05
# After a file event that did not move data_version yet (see ChangeSignal.wait_for_change).
SETTLE_S = (0.001, 0.005, 0.02)
log = logging.getLogger(__name__)


def is_busy(exc: sqlite3.OperationalError) -> bool:
    """Whether the error is SQLITE_BUSY/LOCKED (another connection holds the lock)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _BUSY_CODES
    message = str(exc).lower()
    return "locked" in message or "busy" in message


def retry_busy(action: Callable[[], T], timeout_s: float) -> T:
    """Run action(), retrying with a short backoff while SQLite reports busy, up to timeout_s.

    busy_timeout already waits inside SQLite; this covers the cases where SQLite returns
    SQLITE_BUSY without calling the busy handler (WAL recovery, journal-mode changes).
    """
    deadline = time.monotonic() + timeout_s
    delay = _FIRST_BACKOFF_S
    while True:
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, _MAX_BACKOFF_S)


def begin_immediate(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Start a transaction holding the write lock from its first statement."""
    retry_busy(lambda: conn.execute("BEGIN IMMEDIATE"), timeout_s)


def open_connection(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    """A connection in autocommit mode with this project's pragmas."""
    conn = sqlite3.connect(
        path,
        timeout=busy_timeout_ms / 1000,
        isolation_level=None,
        # Each connection is used by one thread at a time; close() may run on another thread.
        check_same_thread=False,
    )
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = NORMAL")  # durable enough with WAL, much faster
    return conn


def enable_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Switch the file to WAL (persistent); several processes may race to do it on a new file."""
    mode: object = retry_busy(
        lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0], timeout_s
    )
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"could not switch the database to WAL (got {mode!r})")


_FORK_ORPHANS: list[object] = []


class _ThreadConnection:
    """Owns one thread's connection and closes it explicitly when the thread ends.

    Worker pools (anyio's included) retire idle threads and start new ones. A connection that
    is only garbage-collected leaves its file descriptor open for as long as any other
    connection of the process holds the file (SQLite's unix VFS defers the close); an explicit
    close() lets SQLite reuse it. threading.local drops this holder when its thread ends.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.pid = os.getpid()

    def close(self) -> None:
        # A forked child must not close (and so maybe checkpoint) its parent's connection.
        if self.pid == os.getpid():
            with suppress(sqlite3.Error):
                self.conn.close()

    def __del__(self) -> None:
        self.close()


class SqliteConnector:
    """Per-thread connections to one file, write transactions, and the change token."""

    def __init__(self, path: str, busy_timeout_ms: int = 30000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self.busy_timeout_s = busy_timeout_ms / 1000
        self._local = threading.local()
        self._all_lock = threading.Lock()
        # Weak: a thread's connection goes away with its thread (see _ThreadConnection).
        self._all: weakref.WeakSet[_ThreadConnection] = weakref.WeakSet()
        self._closed = False
        self._pid = os.getpid()
        # Commits made through this object; data_version does not move for a connection's own
        # commits, so the token adds this counter.
        self._count_lock = threading.Lock()
        self._own_commit_count = 0
        # change_token reads data_version on one connection that never writes: its value then
        # moves on every commit by any other connection, this process's threads included, and
        # tokens taken on different threads stay comparable.
        self._watch_lock = threading.Lock()
        self._watch: sqlite3.Connection | None = None
        # wait_for_change sleeps on this; own commits and the file watch bump it.
        self._signal = ChangeSignal()
        self._files: FileWatch | None = None
        self._files_failed = False

    # ----------------------------------------------------------------- connections
    def connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        if self._closed:
            raise sqlite3.ProgrammingError("the repository is closed")
        if self._pid != os.getpid():
            self._after_fork()
        holder: _ThreadConnection | None = getattr(self._local, "holder", None)
        if holder is None:
            holder = _ThreadConnection(open_connection(self.path, self.busy_timeout_ms))
            with self._all_lock:
                self._all.add(holder)
            self._local.holder = holder
        return holder.conn

    def _after_fork(self) -> None:
        # Connections inherited through fork must not be used (or closed) by the child: drop
        # them without closing (_ThreadConnection checks the pid; the watch is kept alive).
        _FORK_ORPHANS.append(self._watch)
        self._pid = os.getpid()
        self._local = threading.local()
        self._all_lock = threading.Lock()
        self._all = weakref.WeakSet()
        self._watch_lock = threading.Lock()
        self._watch = None
        self._count_lock = threading.Lock()
        self._signal = ChangeSignal()
        self._files = None  # the watch thread did not survive the fork; its fds close with it

    def close(self) -> None:
        """Close every connection this object opened. Safe to call twice."""
        self._closed = True
        with self._all_lock:
            holders = list(self._all)
            self._all = weakref.WeakSet()
        for holder in holders:
            holder.close()
        with self._watch_lock:
            if self._watch is not None:
                with suppress(sqlite3.Error):
                    self._watch.close()
                self._watch = None
            files, self._files = self._files, None
        if files is not None:
            files.close()
        self._signal.interrupt()

    # ----------------------------------------------------------------- transactions
    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A transaction that may write: BEGIN IMMEDIATE … COMMIT, or ROLLBACK on error."""
        conn = self.connection()
        begin_immediate(conn, self.busy_timeout_s)
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        with self._count_lock:
            self._own_commit_count += 1
        self._signal.bump()  # waiters of this process need not wait for the file event

    def query(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        """Run one read statement in autocommit mode (a consistent snapshot) and fetch it all."""
        conn = self.connection()
        # Fetching everything at once ends the implicit read transaction, so no cursor left
        # open keeps the WAL from being checkpointed.
        return retry_busy(lambda: conn.execute(sql, params).fetchall(), self.busy_timeout_s)

    # ----------------------------------------------------------------- change token
    def change_token(self) -> int:
        """Differs after any commit by anyone: data_version combined with our own commits."""
        if self._closed:
            raise sqlite3.ProgrammingError("the repository is closed")
        if self._pid != os.getpid():
            self._after_fork()
        with self._watch_lock:
            if self._watch is None:
                self._watch = open_connection(self.path, self.busy_timeout_ms)
            watch = self._watch
            version = retry_busy(
                lambda: watch.execute("PRAGMA data_version").fetchone()[0], self.busy_timeout_s
            )
        return (int(version) << 32) + (self._own_commit_count & 0xFFFFFFFF)

    def wait_for_change(self, seen: int | None, timeout_s: float) -> int:
        """Sleep until change_token() differs from `seen` (see Repository.wait_for_change)."""
        self._start_file_watch()
        return self._signal.wait_for_change(self.change_token, seen, timeout_s,
                                            self._recheck_s, SETTLE_S)

    def interrupt_waits(self) -> None:
        """Wake every wait_for_change of this process now."""
        self._signal.interrupt()

    def _recheck_s(self) -> float:
        files = self._files
        return SAFETY_RECHECK_S if files is not None and files.alive else NO_WATCH_RECHECK_S

    def _start_file_watch(self) -> None:
        if self._pid != os.getpid():
            self._after_fork()
        with self._watch_lock:
            if self._files is not None or self._files_failed or self._closed:
                return
            try:
                self._files = FileWatch(self.path, self._signal.bump)
            except OSError as exc:
                self._files_failed = True
                log.warning("cannot watch %s for changes (%s); looking every %g s instead",
                            self.path, exc, NO_WATCH_RECHECK_S)
