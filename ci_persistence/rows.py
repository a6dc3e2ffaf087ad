"""Rows to models: the one place that knows how columns map onto ci_common.models.

SQLite's rows (sqlite3.Row) and PostgreSQL's (psycopg dict rows) share the column names; the
value types differ (text or TIMESTAMPTZ, 0/1 or BOOLEAN, TEXT or UTF-8 BYTEA for event text),
and the helpers here accept either.
"""

from __future__ import annotations

from typing import Any, Protocol

from ci_common.models import (
    ApiKey,
    ControllerLease,
    EnvEntry,
    EnvKey,
    EnvState,
    EventKind,
    Job,
    JobEvent,
    JobStatus,
    OutputStream,
    TestReport,
    User,
)
from ci_common.pytest_args import pytest_args_from_json
from ci_common.wire import ReportData
from ci_persistence.timefmt import from_text, opt_from_text

JOB_COLUMNS = (
    "id, user_id, status, created_at, start_time, end_time, exit_code, success, reason, "
    "timeout_seconds, archive_size, controller_id, container_id, cancel_requested, log_cursor, "
    "output_bytes, dropped_bytes, report, pruned_at, pytest_args, python_version, "
    "start_attempted_at, no_cache"
)
ENV_COLUMNS = (
    "id, user_id, engine_id, image_id, requirements_sha256, volume, state, job_id, "
    "python_version, size_bytes, created_at, built_at, last_used_at"
)
EVENT_COLUMNS = "job_id, seq, kind, stream, text, created_at"
USER_COLUMNS = "id, name, email, is_active, created_at"
# api_keys joined with users: k.* for the key, u_* for its owner.
KEY_SELECT = (
    "SELECT k.id, k.user_id, k.name, k.key_hash, k.prefix, k.is_active, k.created_at, "
    "k.last_used_at, u.name AS u_name, u.email AS u_email, u.is_active AS u_is_active, "
    "u.created_at AS u_created_at FROM api_keys k JOIN users u ON u.id = k.user_id"
)


class Row(Protocol):
    """A row addressable by column name: sqlite3.Row or a psycopg dict row."""

    def __getitem__(self, key: str, /) -> Any: ...


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def report_to_text(report: TestReport | None) -> str | None:
    """A job's report as stored in jobs.report: the JSON of its wire form."""
    data = ReportData.from_report(report)
    return None if data is None else data.model_dump_json()


def report_from_text(text: str | None) -> TestReport | None:
    return None if text is None else ReportData.model_validate_json(text).to_report()


def user_from_row(row: Row) -> User:
    return User(id=row["id"], name=row["name"], email=row["email"],
                is_active=bool(row["is_active"]), created_at=from_text(row["created_at"]))


def key_from_row(row: Row) -> ApiKey:
    """An ApiKey from a KEY_SELECT row."""
    return ApiKey(id=row["id"], user_id=row["user_id"], user_email=row["u_email"],
                  name=row["name"], prefix=row["prefix"], is_active=bool(row["is_active"]),
                  created_at=from_text(row["created_at"]),
                  last_used_at=opt_from_text(row["last_used_at"]))


def key_owner_from_row(row: Row) -> User:
    """The owner from a KEY_SELECT row."""
    return User(id=row["user_id"], name=row["u_name"], email=row["u_email"],
                is_active=bool(row["u_is_active"]), created_at=from_text(row["u_created_at"]))


def job_from_row(row: Row) -> Job:
    success = row["success"]
    return Job(
        id=row["id"],
        user_id=row["user_id"],
        status=JobStatus(row["status"]),
        created_at=from_text(row["created_at"]),
        start_time=opt_from_text(row["start_time"]),
        end_time=opt_from_text(row["end_time"]),
        exit_code=row["exit_code"],
        success=None if success is None else bool(success),
        reason=row["reason"],
        timeout_seconds=row["timeout_seconds"],
        archive_size=row["archive_size"],
        controller_id=row["controller_id"],
        container_id=row["container_id"],
        cancel_requested=bool(row["cancel_requested"]),
        log_cursor=row["log_cursor"],
        output_bytes=row["output_bytes"],
        dropped_bytes=row["dropped_bytes"],
        report=report_from_text(row["report"]),
        pruned_at=opt_from_text(row["pruned_at"]),
        pytest_args=pytest_args_from_json(row["pytest_args"]),
        python_version=row["python_version"],
        start_attempted_at=opt_from_text(row["start_attempted_at"]),
        no_cache=bool(row["no_cache"]),
    )


def env_from_row(row: Row) -> EnvEntry:
    return EnvEntry(
        id=row["id"],
        key=EnvKey(user_id=row["user_id"], engine_id=row["engine_id"], image_id=row["image_id"],
                   requirements_sha256=row["requirements_sha256"]),
        volume=row["volume"], state=EnvState(row["state"]), job_id=row["job_id"],
        python_version=row["python_version"], size_bytes=row["size_bytes"],
        created_at=from_text(row["created_at"]), built_at=opt_from_text(row["built_at"]),
        last_used_at=opt_from_text(row["last_used_at"]))


def event_from_row(row: Row) -> JobEvent:
    stream = row["stream"]
    return JobEvent(job_id=row["job_id"], seq=row["seq"], kind=EventKind(row["kind"]),
                    text=_text(row["text"]),
                    stream=None if stream is None else OutputStream(stream),
                    created_at=from_text(row["created_at"]))


# controllers with the count of their claimed-or-running jobs
LEASE_SELECT = (
    "SELECT c.id, c.host, c.pid, c.version, c.token, c.started_at, c.heartbeat_at, c.stopped, "
    "c.engine_id, c.lease_s, "
    "(SELECT count(*) FROM jobs j WHERE j.controller_id = c.id "
    "AND j.status IN ('queued', 'running')) AS running_jobs FROM controllers c"
)


def lease_from_row(row: Row) -> ControllerLease:
    return ControllerLease(id=row["id"], host=row["host"], pid=row["pid"],
                           version=row["version"], token=row["token"],
                           started_at=from_text(row["started_at"]),
                           heartbeat_at=from_text(row["heartbeat_at"]),
                           stopped=bool(row["stopped"]), running_jobs=row["running_jobs"],
                           engine_id=row["engine_id"], lease_s=row["lease_s"])
