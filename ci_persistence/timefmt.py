"""Timestamps as the repositories store them: aware UTC datetimes, ISO-8601 text in SQLite,
TIMESTAMPTZ in PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime


def as_utc(when: datetime) -> datetime:
    """The same instant as an aware UTC datetime (a naive value is taken to be UTC already)."""
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def to_text(when: datetime) -> str:
    """ISO-8601 UTC with microseconds, so text order is time order."""
    return as_utc(when).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def from_text(text: str | datetime) -> datetime:
    """Parse what to_text wrote back into an aware UTC datetime (PostgreSQL's come parsed)."""
    if isinstance(text, datetime):
        return as_utc(text)
    return as_utc(datetime.fromisoformat(text))


def opt_to_text(when: datetime | None) -> str | None:
    return None if when is None else to_text(when)


def opt_from_text(text: str | datetime | None) -> datetime | None:
    return None if text is None else from_text(text)
