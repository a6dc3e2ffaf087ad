"""Everything `ci-admin` prints, as pure functions from models to text.

Human output follows the seed README's shapes; `--json` output is always a list of objects with
ISO-8601 timestamps, so scripts parse `user list`, `user get` and `key list` the same way.
Nothing here ever sees a key hash; the plaintext key appears only in `key_created`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from ci_admin.actions import ActiveChange, CreatedKey, Revocation
from ci_common.errors import CIError
from ci_common.models import ApiKey, ControllerLease, EnvEntry, EnvState, PruneResult, User
from ci_common.settings import format_size

_COLUMN_GAP = "   "


def format_time(when: datetime | None, missing: str = "never") -> str:
    """A timestamp for tables: `2025-10-12 19:30:00` in UTC, or `missing` for None."""
    if when is None:
        return missing
    return when.strftime("%Y-%m-%d %H:%M:%S")


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, a dashed rule under the header (the shape of `ci list`)."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return _COLUMN_GAP.join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    rule = "-" * (sum(widths) + len(_COLUMN_GAP) * (len(widths) - 1))
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


# ---------------------------------------------------------------------------- JSON


def user_json(user: User) -> dict[str, Any]:
    """A user as a JSON object (the shape of `user list --json` and `user get --json`)."""
    return {
        "id": user.id,
        "name": user.name,
        "email": user.email,
        "is_active": user.is_active,
        "created_at": user.created_at.isoformat(),
    }


def key_json(key: ApiKey) -> dict[str, Any]:
    """A key's metadata as a JSON object: never the key, never its hash."""
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "user_id": key.user_id,
        "user_email": key.user_email,
        "is_active": key.is_active,
        "created_at": key.created_at.isoformat(),
        "last_used_at": key.last_used_at.isoformat() if key.last_used_at else None,
    }


def json_list(objects: Sequence[dict[str, Any]]) -> str:
    return json.dumps(list(objects), indent=2, ensure_ascii=False)


# ---------------------------------------------------------------------------- users


def user_created(user: User) -> str:
    """The success message of `user create`."""
    return (
        "✓ User created successfully\n"
        f"  ID:    {user.id}\n"
        f"  Name:  {user.name}\n"
        f"  Email: {user.email}"
    )


def users_table(users: Sequence[User]) -> str:
    """`user list`: one row per user, oldest first."""
    if not users:
        return "No users."
    rows = [[u.id, u.name, u.email, _yes_no(u.is_active), format_time(u.created_at)]
            for u in users]
    return table(["ID", "NAME", "EMAIL", "ACTIVE", "CREATED"], rows)


def user_detail(user: User, keys: Sequence[ApiKey]) -> str:
    """`user get`: one user, with how many keys they hold."""
    active = sum(1 for k in keys if k.is_active)
    return (
        f"ID:       {user.id}\n"
        f"Name:     {user.name}\n"
        f"Email:    {user.email}\n"
        f"Active:   {_yes_no(user.is_active)}\n"
        f"Created:  {format_time(user.created_at)}\n"
        f"API keys: {len(keys)} ({active} active)"
    )


def active_changed(change: ActiveChange) -> str:
    """The ✓ line of `user activate` / `user deactivate`."""
    state = "activated" if change.user.is_active else "deactivated"
    who = f"{change.user.email} ({change.user.id})"
    if not change.changed:
        return f"✓ User {who} was already {state}"
    line = f"✓ User {state}: {who}"
    if not change.user.is_active:
        line += "\n  Their API keys are refused until the user is activated again."
    return line


# ---------------------------------------------------------------------------- keys


def key_created(created: CreatedKey) -> str:
    """The one and only display of a new key (seed shape, plus the key id needed to revoke it)."""
    return (
        "✓ API key created successfully\n"
        "\n"
        f"  API Key: {created.plaintext}\n"
        f"  Key ID:  {created.key.id}\n"
        f"  Name:    {created.key.name}\n"
        f"  User:    {created.user.email}\n"
        "\n"
        "⚠️  IMPORTANT: This is the only time you'll see this key!\n"
        "   Save it securely now."
    )


def inactive_owner_warning(user: User) -> str:
    """Said on stderr when a key is made for a deactivated user (allowed; see create_key)."""
    return (f"Warning: user {user.email} is deactivated; this key is refused until "
            f"`ci-admin user activate {user.id}`.")


def keys_table(keys: Sequence[ApiKey]) -> str:
    """`key list`: metadata only, with each key's owner."""
    if not keys:
        return "No API keys."
    rows = [[k.id, k.name, k.prefix, k.user_email, _yes_no(k.is_active),
             format_time(k.created_at), format_time(k.last_used_at)] for k in keys]
    return table(["KEY ID", "NAME", "PREFIX", "USER", "ACTIVE", "CREATED", "LAST USED"], rows)


def controller_json(lease: ControllerLease, now: datetime) -> dict[str, Any]:
    """A controller as a JSON object (never its lease token)."""
    return {
        "id": lease.id,
        "host": lease.host,
        "pid": lease.pid,
        "version": lease.version,
        "started_at": lease.started_at.isoformat(),
        "heartbeat_at": lease.heartbeat_at.isoformat(),
        "heartbeat_age_s": round(lease.heartbeat_age_s(now), 1),
        "running_jobs": lease.running_jobs,
        "stopped": lease.stopped,
        "lease_s": lease.lease_s,
        "alive": lease.is_alive(now),
    }


def controllers_table(leases: Sequence[ControllerLease], now: datetime) -> str:
    """`controller list`: each controller id, its holder, heartbeat age, jobs and liveness."""
    if not leases:
        return "No controllers."
    rows = [[c.id, c.host, str(c.pid), c.version, format_time(c.started_at),
             f"{c.heartbeat_age_s(now):.0f} s ago", str(c.running_jobs),
             "yes" if c.is_alive(now) else ("no (stopped)" if c.stopped else "no")]
            for c in leases]
    return table(["CONTROLLER", "HOST", "PID", "VERSION", "STARTED", "HEARTBEAT", "JOBS",
                  "ALIVE"], rows)


def env_json(entry: EnvEntry, emails: Mapping[str, str]) -> dict[str, Any]:
    """A cached environment as a JSON object."""
    return {
        "id": entry.id,
        "user_id": entry.key.user_id,
        "user_email": emails.get(entry.key.user_id, ""),
        "state": entry.state.value,
        "size_bytes": entry.size_bytes,
        "python_version": entry.python_version,
        "requirements_sha256": entry.key.requirements_sha256,
        "image_id": entry.key.image_id,
        "engine_id": entry.key.engine_id,
        "volume": entry.volume,
        "job_id": entry.job_id,
        "created_at": entry.created_at.isoformat(),
        "built_at": entry.built_at.isoformat() if entry.built_at else None,
        "last_used_at": entry.last_used_at.isoformat() if entry.last_used_at else None,
    }


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "-"
    seconds = max((now - when).total_seconds(), 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def envs_table(entries: Sequence[EnvEntry], emails: Mapping[str, str], now: datetime) -> str:
    """`cache list`: one line per cached environment, and the total of the ready ones."""
    if not entries:
        return "No cached environments."
    rows = [[e.id[:8], emails.get(e.key.user_id, e.key.user_id), e.state.value,
             format_size(e.size_bytes), e.python_version or "-",
             e.key.requirements_sha256[:12], e.key.image_id.removeprefix("sha256:")[:12],
             e.key.engine_id[:12], _ago(e.built_at, now), _ago(e.last_used_at, now)]
            for e in entries]
    ready = [e for e in entries if e.state is EnvState.READY]
    total = (f"{len(ready)} ready, {format_size(sum(e.size_bytes for e in ready))} "
             f"(budget per engine: CI_ENV_CACHE_SIZE)")
    return table(["ENTRY", "USER", "STATE", "SIZE", "PYTHON", "REQUIREMENTS", "IMAGE",
                  "ENGINE", "BUILT", "LAST USED"], rows) + "\n" + total


def envs_pruned(entries: Sequence[EnvEntry]) -> str:
    """`cache prune`: how many entries were marked, and what happens next."""
    if not entries:
        return "No cached environments to prune."
    plural = "environment" if len(entries) == 1 else "environments"
    return (f"Marked {len(entries)} cached {plural} for removal "
            f"({format_size(sum(e.size_bytes for e in entries))}); each controller removes "
            "its volumes at its next pass.")


def prune_result(result: PruneResult, cutoff: datetime, dry_run: bool) -> str:
    """`jobs prune`: how many jobs lost (or would lose) their output and archive."""
    before = cutoff.strftime("%Y-%m-%d %H:%M UTC")
    if result.jobs == 0:
        return f"No job finished before {before} still has output or an archive."
    verb = "Would remove" if dry_run else "Removed"
    plural = "job" if result.jobs == 1 else "jobs"
    return (f"{verb} the output and archives of {result.jobs} {plural} finished before "
            f"{before}: {format_size(result.freed_bytes)}"
            f"{' would be freed' if dry_run else ' freed'}.")


def key_revoked(revocation: Revocation) -> str:
    """The ✓ line of `key revoke`."""
    key = revocation.key
    what = f"{key.id} ({key.name}, {key.prefix}…, user {key.user_email})"
    if not revocation.changed:
        return f"✓ API key {what} was already revoked"
    return f"✓ API key revoked: {what}"


# ---------------------------------------------------------------------------- errors


def describe_error(exc: Exception, db_path: str | None) -> tuple[str, int]:
    """One line for stderr (without `Error: `) and the exit code, for any failure."""
    if isinstance(exc, CIError):
        message, code = exc.message, exc.exit_code
    elif isinstance(exc, sqlite3.Error):
        where = f" ({db_path})" if db_path else ""
        message, code = f"database error{where}: {exc}", 1
    elif isinstance(exc, OSError):
        target = exc.filename if exc.filename is not None else db_path
        reason = exc.strerror or str(exc)
        message, code = (f"{reason}: {target}" if target else reason), 1
    else:
        message = f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for details)"
        code = 1
    return " ".join(message.split()), code
