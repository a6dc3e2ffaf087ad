"""Repository implementations: SQLite (the default, shared by processes) and in-memory (tests)."""

from __future__ import annotations

from ci_common.settings import Settings
from ci_persistence.memory import InMemoryRepository
from ci_persistence.sqlite import SqliteRepository

__all__ = ["InMemoryRepository", "SqliteRepository", "open_repository"]


def open_repository(settings: Settings) -> SqliteRepository:
    """The repository the services use: the SQLite file at settings.db_path (created if new)."""
    return SqliteRepository(settings.db_path)
