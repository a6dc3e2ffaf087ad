"""Repository implementations: SQLite (the embedded default, shared by the processes of one
host), PostgreSQL (shared by hosts) and in-memory (tests)."""

from __future__ import annotations

from ci_common.settings import Settings
from ci_persistence.memory import InMemoryRepository
from ci_persistence.postgres import PostgresRepository
from ci_persistence.sqlite import SqliteRepository

__all__ = ["InMemoryRepository", "PostgresRepository", "SqliteRepository", "open_repository"]


def open_repository(settings: Settings) -> SqliteRepository | PostgresRepository:
    """The repository the services use: PostgreSQL at settings.database_url when it is set,
    else the SQLite file at settings.db_path (created if new)."""
    if settings.database_url:
        return PostgresRepository(settings.database_url)
    return SqliteRepository(settings.db_path)
