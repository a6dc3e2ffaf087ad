"""A connection pool that gets over a PostgreSQL restart at once, instead of minutes later.

psycopg-pool reconnects by itself, but with exponential backoff (1 s, 2 s, 4 s, … until its
reconnect timeout): after an outage of a minute it may wait another minute before it tries
again, and meanwhile every caller waits its whole pool timeout (30 s) before hearing that the
database is away. A server should answer 503 at once, and every service should be back as
soon as the database is.

So a connection found broken (or a pool that found none in time) ends that pool: it is closed, and
until the server answers again each call tries one direct connection, which fails fast while
the server is down (connection refused) and, the first time it succeeds, starts a fresh pool.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

log = logging.getLogger(__name__)

Pool = ConnectionPool[psycopg.Connection[DictRow]]
class RecoveringPool:
    """A psycopg pool on one URL that is replaced by a fresh one after an outage."""

    def __init__(self, url: str, size: int, timeout_s: float, shown: str,
                 connect_kwargs: dict[str, Any]) -> None:
        self._url = url
        self._size = size
        self._timeout_s = timeout_s
        self._shown = shown  # the URL without its password, for log lines
        self._connect_kwargs = connect_kwargs
        self._lock = threading.Lock()
        self._pool: Pool | None = None
        self._closed = False

    def open(self) -> None:
        """Start the first pool; it connects in the background."""
        with self._lock:
            self._pool = self._new_pool()

    def close(self) -> None:
        """Close the pool. Safe to call twice."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[DictRow]]:
        """A pooled connection (autocommit, dict rows). Raises psycopg and pool errors as is."""
        pool = self._current()
        lost = False
        try:
            with pool.connection() as conn:
                try:
                    yield conn
                except psycopg.OperationalError:
                    lost = conn.broken  # not a cancelled statement: the connection is gone
                    raise
        except PoolTimeout:
            lost = True
            raise
        finally:
            if lost:
                self._end(pool)

    def _new_pool(self) -> Pool:
        pool: Pool = ConnectionPool(
            self._url, min_size=1, max_size=self._size, timeout=self._timeout_s,
            kwargs={"autocommit": True, "row_factory": dict_row, **self._connect_kwargs},
            connection_class=psycopg.Connection[DictRow], name="ci", open=False)
        pool.open(wait=False)
        return pool

    def _current(self) -> Pool:
        with self._lock:
            if self._closed:
                raise PoolClosed("the pool is closed")
            if self._pool is not None:
                return self._pool
        # After an outage: one direct connection says whether the server is back (and fails
        # fast while it is not), then a fresh pool starts without any backoff behind it.
        psycopg.connect(self._url, **self._connect_kwargs).close()
        with self._lock:
            if self._closed:
                raise PoolClosed("the pool is closed")
            if self._pool is None:
                log.warning("PostgreSQL at %s answers again; new connections", self._shown)
                self._pool = self._new_pool()
            return self._pool

    def _end(self, pool: Pool) -> None:
        with self._lock:
            if self._pool is not pool:
                return  # another caller ended it already
            self._pool = None
        log.warning("lost the connection to PostgreSQL at %s; reconnecting when it answers",
                    self._shown)
        # Closing waits for the pool's workers: not on the caller's time.
        threading.Thread(target=pool.close, daemon=True, name="ci-pool-close").start()
