"""Versioned schema migrations: `migrations/NNNN_name.sql`, applied in order, recorded in
`PRAGMA user_version`.

Several processes may open a new file at the same moment; each applies pending migrations inside
`BEGIN IMMEDIATE` and re-reads the version inside the transaction, so exactly one of them does
the work and the others find it done.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from ci_persistence.connection import begin_immediate, retry_busy

_FILE_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: its version number and its SQL statements."""

    version: int
    name: str
    statements: list[str]


def split_statements(script: str) -> list[str]:
    """Split a SQL script into complete statements (triggers with inner `;` stay whole)."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statement = _strip_comments(pending)
            if statement:
                statements.append(statement)
            pending = ""
    if _strip_comments(pending):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {pending!r}")
    return statements


def _strip_comments(sql: str) -> str:
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return "\n".join(lines).strip()


def load_migrations(folder_name: str = "migrations",
                    split: Callable[[str], list[str]] = split_statements) -> list[Migration]:
    """Every migration shipped in the package folder, by version; versions must be 1, 2, 3…

    SQLite's are in `migrations/`; PostgreSQL's in `migrations/postgres/`, each file one script.
    """
    folder = resources.files("ci_persistence").joinpath(folder_name)
    migrations = []
    for entry in folder.iterdir():
        match = _FILE_NAME.fullmatch(entry.name)
        if match:
            migrations.append(Migration(version=int(match.group(1)), name=entry.name,
                                        statements=split(entry.read_text("utf-8"))))
    migrations.sort(key=lambda m: m.version)
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"migration versions must be 1..n without gaps, found {versions}")
    return migrations


def schema_version(conn: sqlite3.Connection) -> int:
    """The version recorded in the file (0 for a new or empty file)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, busy_timeout_s: float) -> int:
    """Apply pending migrations atomically; return the schema version afterwards."""
    migrations = load_migrations()
    target = migrations[-1].version if migrations else 0
    found: int = retry_busy(lambda: schema_version(conn), busy_timeout_s)
    if found >= target:
        return found
    begin_immediate(conn, busy_timeout_s)
    try:
        current = schema_version(conn)  # another process may have migrated while we waited
        for migration in migrations:
            if migration.version > current:
                for statement in migration.statements:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {migration.version}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return schema_version(conn)
