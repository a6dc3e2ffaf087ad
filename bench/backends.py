"""The database a bench deployment runs on, by backend name: one place for every bench."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def database(backend: str) -> Iterator[str | None]:
    """None for SQLite (the deployment's own file), else a fresh PostgreSQL database's URL.

    The PostgreSQL database starts empty: the services migrate it themselves, under the
    migration's advisory lock, as they would in production.
    """
    if backend == "sqlite":
        yield None
        return
    from tests.postgres import PostgresServer  # only PostgreSQL runs need its binaries

    server = PostgresServer().start()
    try:
        yield server.url(server.create_database(template=None))
    finally:
        server.stop()
