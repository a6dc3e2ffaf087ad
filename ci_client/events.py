"""Typed job events as the client reads them from the server's event stream.

Each Server-Sent Event carries `id: <seq>`, `event: status|output|end` and a JSON body from
`ci_common.wire` (read with the client's decoders, `ci_client.wire`); `parse_event` turns one
into a StatusEvent, OutputEvent or EndEvent. While the job waits,
`event: queue` (no id of its own) becomes a QueueEvent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from ci_client.wire import (
    SSE_EVENT_END,
    SSE_EVENT_OUTPUT,
    SSE_EVENT_QUEUE,
    SSE_EVENT_STATUS,
    EndData,
    OutputData,
    QueueData,
    StatusData,
)
from ci_common.errors import ServerError
from ci_common.statuses import JobStatus, OutputStream


class ServerSentEvent(Protocol):
    """One message of an event stream (what httpx_sse's ServerSentEvent provides)."""

    @property
    def event(self) -> str: ...
    @property
    def data(self) -> str: ...
    @property
    def id(self) -> str: ...


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
            return QueueEvent(QueueData.from_json(json.loads(sse.data)).ahead)
        except ValueError:  # json.JSONDecodeError is one
            return None  # only a progress hint: never worth failing the stream for
    if sse.event not in (SSE_EVENT_STATUS, SSE_EVENT_OUTPUT, SSE_EVENT_END):
        return None  # a newer server may send more kinds; old clients ignore them
    try:
        seq = int(sse.id)
    except ValueError:
        raise ServerError(
            f"malformed event from the CI server: id {sse.id!r} is not a number") from None
    try:
        body = json.loads(sse.data)
        if sse.event == SSE_EVENT_STATUS:
            return StatusEvent(seq, StatusData.from_json(body).status)
        if sse.event == SSE_EVENT_OUTPUT:
            output = OutputData.from_json(body)
            return OutputEvent(seq, output.stream, output.text)
        return EndEvent(seq, EndData.from_json(body))
    except ValueError as exc:  # json.JSONDecodeError is one
        raise ServerError(f"malformed {sse.event} event from the CI server: {exc}") from exc
