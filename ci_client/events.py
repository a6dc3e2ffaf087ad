"""Typed job events as the client reads them from the server's event stream.

Each Server-Sent Event carries `id: <seq>`, `event: status|output|end` and a JSON body from
`ci_common.wire`; `parse_event` turns one into a StatusEvent, OutputEvent or EndEvent. While the
job waits, `event: queue` (no id of its own) becomes a QueueEvent.
"""

from __future__ import annotations

from dataclasses import dataclass

from httpx_sse import ServerSentEvent
from pydantic import ValidationError

from ci_common.errors import ServerError
from ci_common.models import JobStatus, OutputStream
from ci_common.wire import (
    SSE_EVENT_END,
    SSE_EVENT_OUTPUT,
    SSE_EVENT_QUEUE,
    SSE_EVENT_STATUS,
    EndData,
    OutputData,
    QueueData,
    StatusData,
)


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """The job moved to a new status (queued, running)."""

    seq: int
    status: JobStatus


@dataclass(frozen=True, slots=True)
class OutputEvent:
    """A chunk of the job's output: one or more lines, exactly as printed."""

    seq: int
    stream: OutputStream
    text: str


@dataclass(frozen=True, slots=True)
class EndEvent:
    """The job is over; the stream ends after this event."""

    seq: int
    end: EndData


@dataclass(frozen=True, slots=True)
class QueueEvent:
    """Where the waiting job stands: `ahead` jobs go first; None once it is starting.

    Not a stored event: it has no seq, and a reconnect neither repeats nor skips for it.
    """

    ahead: int | None


JobStreamEvent = StatusEvent | OutputEvent | EndEvent | QueueEvent


def parse_event(sse: ServerSentEvent) -> JobStreamEvent | None:
    """The typed event for one SSE message; None for kinds this client does not know."""
    if sse.event == SSE_EVENT_QUEUE:
        try:
            return QueueEvent(QueueData.model_validate_json(sse.data).ahead)
        except ValidationError:
            return None  # only a progress hint: never worth failing the stream for
    if sse.event not in (SSE_EVENT_STATUS, SSE_EVENT_OUTPUT, SSE_EVENT_END):
        return None  # a newer server may send more kinds; old clients ignore them
    try:
        seq = int(sse.id)
    except ValueError:
        raise ServerError(
            f"malformed event from the CI server: id {sse.id!r} is not a number") from None
    try:
        if sse.event == SSE_EVENT_STATUS:
            return StatusEvent(seq, StatusData.model_validate_json(sse.data).status)
        if sse.event == SSE_EVENT_OUTPUT:
            output = OutputData.model_validate_json(sse.data)
            return OutputEvent(seq, output.stream, output.text)
        return EndEvent(seq, EndData.model_validate_json(sse.data))
    except ValidationError as exc:
        first = exc.errors()[0]["msg"] if exc.errors() else str(exc)
        raise ServerError(f"malformed {sse.event} event from the CI server: {first}") from exc
