"""PostgreSQL schema migrations: `migrations/postgres/NNNN_name.sql`, in order, recorded in the
`schema_migrations` table.

Several processes (controllers, server replicas, ci-admin) may start at once against a new
database. Each migrates inside one transaction that first takes a transaction-scoped advisory
lock, then reads the version: exactly one of them applies what is pending, the others wait on
the lock and find it done. DDL is transactional in PostgreSQL, so a failed migration leaves
nothing half-applied.
"""

from __future__ import annotations

from typing import Any

import psycopg

from ci_persistence.migrate import Migration, load_migrations

MIGRATIONS_FOLDER = "migrations/postgres"
# The advisory lock every migrator takes ("ci_migra" in ASCII), distinct from the job locks,
# which use the two-key form (see postgres.py).
MIGRATION_LOCK = 0x63695F6D69677261


def postgres_migrations() -> list[Migration]:
    """PostgreSQL's migrations, by version; each file runs as one script."""
    return load_migrations(MIGRATIONS_FOLDER, split=lambda script: [script])


def migrate(conn: psycopg.Connection[tuple[Any, ...]]) -> int:
    """Apply pending migrations atomically under the migration lock; return the version."""
    migrations = postgres_migrations()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                     "version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                     "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
        current = int(row[0]) if row else 0
        for migration in migrations:
            if migration.version > current:
                for script in migration.statements:
                    conn.execute(script)
                conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                             (migration.version, migration.name))
                current = migration.version
    return current
