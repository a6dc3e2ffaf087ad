"""Repository implementations: SQLite (the embedded default, shared by the processes of one
host), PostgreSQL (`ci_persistence.postgres`, shared by hosts) and in-memory (tests)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ci_common.settings import Settings
from ci_persistence.memory import InMemoryRepository
from ci_persistence.sqlite import SqliteRepository

if TYPE_CHECKING:
    from ci_persistence.postgres import PostgresRepository

__all__ = ["InMemoryRepository", "SqliteRepository", "open_repository"]


def open_repository(settings: Settings) -> SqliteRepository | PostgresRepository:
    """The repository the services use: PostgreSQL at settings.database_url when it is set,
    else the SQLite file at settings.db_path (created if new)."""
    if settings.database_url:
        # Imported here: psycopg adds ~0.3 s to the start of every command that never uses it.
        from ci_persistence.postgres import PostgresRepository

        return PostgresRepository(settings.database_url)
    return SqliteRepository(settings.db_path)
