"""PostgreSQL connections: a pool, transactions that retry on deadlock, the change token, and
the one place where psycopg errors become ours.

Every write transaction ends with a NOTIFY on CHANGES_CHANNEL carrying this connector's id. The
change token listens on one dedicated connection and counts the notifications of everyone else
(its own commits it counts as they return, so the token moves at once for them). Reading the
token is one non-blocking look at that connection's socket: no query, no round trip.
`wait_for_change` sleeps instead: a thread sleeps in select() on that socket and wakes the
waiters (a ChangeSignal) when a notification arrives; our own commits wake them directly.

No error message ever holds the URL's password: messages name the database by its redacted URL
and driver text is scrubbed (ci_common.dburl).
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow
from psycopg_pool import PoolClosed, PoolTimeout

from ci_common.dburl import redact_url, scrub
from ci_common.errors import CIError, DatabaseError, DatabaseUnavailable
from ci_persistence.pg_pool import RecoveringPool
from ci_persistence.waiting import SAFETY_RECHECK_S, ChangeSignal

T = TypeVar("T")
Cursor = psycopg.Cursor[DictRow]

CHANGES_CHANNEL = "ci_changes"
CONNECT_TIMEOUT_S = 10  # libpq waits forever for an unreachable host unless told
POOL_TIMEOUT_S = 30.0  # how long a call waits for a pooled connection before giving up
DEFAULT_POOL_SIZE = 10
DEADLOCK_ATTEMPTS = 3
HELD_BACK_RECHECK_S = 0.05  # see hold_back()
LISTEN_RETRY_S = 1.0  # the listening thread's pause between attempts to reconnect
log = logging.getLogger(__name__)


class PostgresConnector:
    """A connection pool on one database, write transactions, and the change token."""

    def __init__(self, url: str, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        self.url = url
        self.shown = redact_url(url)
        self._kwargs: dict[str, Any] = {}
        with self.errors():
            if "connect_timeout" not in conninfo_to_dict(url):
                self._kwargs["connect_timeout"] = CONNECT_TIMEOUT_S
        self._instance = uuid.uuid4().hex  # the NOTIFY payload: our own commits are not news
        self._pool: RecoveringPool | None = None
        self._pool_size = pool_size
        self._closed = False
        self._count_lock = threading.Lock()
        self._changes = 0  # own commits + others' notifications + listener reconnects
        self._listen_lock = threading.Lock()
        self._listener: psycopg.Connection[tuple[Any, ...]] | None = None
        self._held_back = False
        self._held_back_bumped = 0.0
        self._signal = ChangeSignal()  # wait_for_change sleeps on it
        self._waker_lock = threading.Lock()
        self._waker: threading.Thread | None = None
        self._waker_pipe: tuple[int, int] | None = None  # (read, write): wakes it to stop

    # ----------------------------------------------------------------- connections
    def connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        """One connection outside the pool (migrations, the listener); autocommit."""
        with self.errors():
            return psycopg.connect(self.url, autocommit=True, **self._kwargs)

    def open_pool(self) -> None:
        """Start the pool; it connects in the background (connect() proved the server is up)."""
        self._pool = RecoveringPool(self.url, self._pool_size, POOL_TIMEOUT_S, self.shown,
                                    self._kwargs)
        with self.errors():
            self._pool.open()

    def close(self) -> None:
        """Close the pool and the listener. Safe to call twice."""
        self._closed = True
        with self._waker_lock:
            if self._waker_pipe is not None:
                with suppress(OSError):
                    os.write(self._waker_pipe[1], b"x")
        self._signal.interrupt()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        with self._listen_lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            with suppress(psycopg.Error):
                listener.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[DictRow]]:
        if self._closed or self._pool is None:
            raise DatabaseError("the repository is closed")
        with self._pool.connection() as conn:
            yield conn

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Turn psycopg's errors into ours (ci_common.errors), without the password."""
        try:
            yield
        except CIError:
            raise
        except (psycopg.OperationalError, PoolTimeout, PoolClosed) as exc:
            raise DatabaseUnavailable(f"cannot reach PostgreSQL at {self.shown}: "
                                      f"{self._reason(exc)}") from None
        except psycopg.Error as exc:
            raise DatabaseError(f"PostgreSQL error at {self.shown}: {self._reason(exc)}"
                                ) from None

    def _reason(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split()) or type(exc).__name__
        return scrub(text, self.url)

    # ----------------------------------------------------------------- transactions
    def write(self, work: Callable[[Cursor], T]) -> T:
        """Run work(cursor) in one transaction that ends with our NOTIFY; commit, or roll back.

        A deadlock (PostgreSQL aborts one of the transactions in a cycle) is retried from the
        start: every work function is a whole transaction and may run again.
        """
        with self.errors():
            for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
                try:
                    with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
                        result = work(cur)
                        cur.execute("SELECT pg_notify(%s, %s)",
                                    (CHANGES_CHANNEL, self._instance))
                except psycopg.errors.DeadlockDetected:
                    if attempt == DEADLOCK_ATTEMPTS:
                        raise
                    time.sleep(0.01 * attempt)
                    continue
                with self._count_lock:
                    self._changes += 1
                self._signal.bump()
                return result
        raise AssertionError("unreachable")

    def read(self, work: Callable[[Cursor], T]) -> T:
        """Run work(cursor) in one read-only transaction: every statement sees one snapshot."""
        with self.errors(), self._connection() as conn, conn.transaction(), \
                conn.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return work(cur)

    def query(self, sql: str, params: Any = ()) -> list[DictRow]:
        """One statement in autocommit mode (its own snapshot), fetched whole."""
        with self.errors(), self._connection() as conn:
            return conn.execute(sql, params).fetchall()

    # ----------------------------------------------------------------- change token
    def change_token(self) -> int:
        """Differs after any commit by anyone; cheap (no query, see the module docstring)."""
        if self._closed:
            raise DatabaseError("the repository is closed")
        with self._listen_lock:
            news = self._drain_notifications()
        with self._count_lock:
            self._changes += news
            if self._held_back and time.monotonic() - self._held_back_bumped >= \
                    HELD_BACK_RECHECK_S:
                self._held_back_bumped = time.monotonic()
                self._changes += 1
            return self._changes

    def wait_for_change(self, seen: int | None, timeout_s: float) -> int:
        """Sleep until change_token() differs from `seen` (see Repository.wait_for_change)."""
        self._start_waker()
        return self._signal.wait_for_change(self.change_token, seen, timeout_s,
                                            self._recheck_s)

    def interrupt_waits(self) -> None:
        """Wake every wait_for_change of this process now."""
        self._signal.interrupt()

    def _recheck_s(self) -> float:
        # While rows are held back the token moves by time alone (see hold_back).
        return HELD_BACK_RECHECK_S if self._held_back else SAFETY_RECHECK_S

    def _start_waker(self) -> None:
        with self._waker_lock:
            if self._closed or (self._waker is not None and self._waker.is_alive()):
                return
            self._waker_pipe = os.pipe()
            self._waker = threading.Thread(target=self._wake_on_notify, args=(self._waker_pipe,),
                                           name="ci-pg-listen", daemon=True)
            self._waker.start()

    def _wake_on_notify(self, pipe: tuple[int, int]) -> None:
        """The waker thread: sleep in select() on the LISTEN socket, count what arrives, and
        wake the waiters; reconnect the listener when it broke."""
        try:
            while not self._closed:
                with self._listen_lock:
                    listener = self._listener
                if listener is None:
                    try:
                        self.change_token()  # connects and LISTENs; counts as a change
                    except CIError:
                        select.select([pipe[0]], [], [], LISTEN_RETRY_S)
                        continue
                    self._signal.bump()
                    continue
                try:
                    readable, _, _ = select.select([listener.pgconn.socket, pipe[0]], [], [])
                except (OSError, ValueError, psycopg.Error):
                    readable = []  # the listener was closed under us: look at it again
                if pipe[0] in readable or self._closed:
                    return
                with self._listen_lock:
                    news = self._drain_notifications() if self._listener is listener else 1
                if news:
                    with self._count_lock:
                        self._changes += news
                    self._signal.bump()
        except Exception:  # never silently: waiters fall back to their safety re-check
            log.exception("PostgreSQL change listener stopped")
        finally:
            with self._waker_lock:
                for fd in pipe:
                    os.close(fd)
                if self._waker_pipe is pipe:
                    self._waker_pipe = None

    def hold_back(self, held: bool) -> None:
        """poll_events saw committed events it may not hand out yet (an older transaction is
        still running). Until a poll finds none, the token moves every HELD_BACK_RECHECK_S:
        the transaction holding them back may end without a NOTIFY (a rollback, or a client
        that is not ours), and the poller must then look again by itself.
        """
        with self._count_lock:
            self._held_back = held

    def _drain_notifications(self) -> int:
        """Count others' notifications that arrived; (re)connect the listener when needed."""
        if self._listener is None:
            self._listener = self.connect()
            with self.errors():
                self._listener.execute(f"LISTEN {CHANGES_CHANNEL}")
            return 1  # anything may have happened while nobody listened
        pgconn = self._listener.pgconn
        try:
            pgconn.consume_input()  # non-blocking: libpq sockets are always non-blocking
        except psycopg.OperationalError:
            # The server went away; drop the connection and listen anew on the next call.
            with suppress(psycopg.Error):
                self._listener.close()
            self._listener = None
            return 1
        news = 0
        instance = self._instance.encode()
        while (notify := pgconn.notifies()) is not None:
            if notify.extra != instance:
                news += 1
        return news
