"""The log cap: which OUTPUT events to drop when a job's stored output outgrows its limit.

Pure decisions shared by every repository implementation, so they all drop the same events and
write the same marker. The head is dropped and the tail kept, because that is where errors are.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ci_common.settings import format_size


@dataclass(frozen=True, slots=True)
class DropPlan:
    """Which of the oldest OUTPUT events to drop (by key), and how many bytes that frees."""

    keys: list[int] = field(default_factory=list)
    bytes: int = 0


def utf8_len(text: str) -> int:
    """Bytes of text as stored and counted by the cap (UTF-8)."""
    return len(text.encode("utf-8"))


def plan_drop(
    total_bytes: int, oldest_first: Iterable[tuple[int, int]], keep_bytes: int
) -> DropPlan:
    """Drop the oldest events, given as (key, size in bytes), until `total_bytes` fits.

    Consumes `oldest_first` only as far as needed, so it may be a lazy database cursor. Whole
    events are dropped: an event larger than the limit on its own goes too, so stored output
    never exceeds the limit (the marker says what happened).
    """
    keys: list[int] = []
    freed = 0
    if total_bytes <= keep_bytes:
        return DropPlan()
    for key, size in oldest_first:
        keys.append(key)
        freed += size
        if total_bytes - freed <= keep_bytes:
            break
    return DropPlan(keys=keys, bytes=freed)


def marker_text(dropped_bytes: int, keep_bytes: int) -> str:
    """The text of the one marker event standing where the dropped output was."""
    return (
        f"[ci] … {format_size(dropped_bytes)} of earlier output dropped "
        f"(log limit {format_size(keep_bytes)}); the last part is kept …\n"
    )
