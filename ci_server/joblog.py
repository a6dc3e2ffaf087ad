"""A job's stored output as one text, the way `ci logs` and a raw-log download want it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ci_common.models import EventKind, JobEvent
from ci_common.repository import Repository

PAGE = 1000  # events read per query


def stored_events(repository: Repository, job_id: str) -> Iterator[JobEvent]:
    """Every stored event of the job, in order, read a page at a time."""
    after = 0
    while True:
        page = repository.list_events(job_id, after_seq=after, limit=PAGE)
        yield from page
        if len(page) < PAGE:
            return
        after = page[-1].seq


def output_text(events: Iterable[JobEvent]) -> str:
    """The output events' text, stdout and stderr interleaved as printed (the marker of
    dropped output included, where the log limit put it)."""
    return "".join(event.text for event in events if event.kind is EventKind.OUTPUT)


def last_lines(text: str, count: int) -> str:
    """The last `count` lines of text (a final line without a newline counts as one)."""
    lines = text.splitlines(keepends=True)
    return "".join(lines[-count:]) if count > 0 else ""
