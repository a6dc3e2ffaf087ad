"""Fixtures shared by every tier: a throwaway PostgreSQL server and fresh databases on it.

The server starts on first use in each pytest process (with xdist, each worker has its own)
and is removed at the end of the session; see tests/postgres.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.postgres import PostgresServer


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A running PostgreSQL server with the migrated template database."""
    server = PostgresServer().start()
    try:
        server.create_template()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, migrated database of its own (dropped afterwards)."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)
