"""The server's event stream as the client reads it: SSE messages, then typed job events.

`iter_sse` turns the bytes of a `text/event-stream` body into ServerSentEvent messages, the
same for every transport (http.client for plain http, httpx for https and proxies), so both
read a stream alike. Each message carries `id: <seq>`, `event: status|output|end` and a JSON
body from `ci_common.wire` (read with the client's decoders, `ci_client.wire`); `parse_event`
turns one into a StatusEvent, OutputEvent or EndEvent. While the job waits, `event: queue`
(no id of its own) becomes a QueueEvent.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One message of an event stream; `id` is the last id the stream set, even an earlier
    message's (the SSE rule a reconnect's Last-Event-ID comes from)."""

    event: str = "message"
    data: str = ""
    id: str = ""


def iter_sse(chunks: Iterable[bytes]) -> Iterator[ServerSentEvent]:
    """The messages of a `text/event-stream` body arriving in `chunks` of any size.

    As the WHATWG rules (and httpx_sse, which the client used before) read a stream: lines
    end with CRLF, LF or CR; `:` starts a comment (the server's keep-alives); a blank line
    ends a message, which is dispatched if it set anything (so a message of only an id, the
    server's opening one, is one too); an unfinished message at the end is dropped.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""  # the start of a line whose end has not arrived yet
    event, last_id = "", ""
    data: list[str] = []
    for chunk in chunks:
        text = pending + decoder.decode(chunk)
        # A CR at the very end may be the first half of a CRLF: keep it for the next chunk.
        cut = len(text) - 1 if text.endswith("\r") else len(text)
        lines = text[:cut].replace("\r\n", "\n").replace("\r", "\n").split("\n")
        pending = lines.pop() + text[cut:]
        for line in lines:
            if not line:
                if event or data or last_id:
                    yield ServerSentEvent(event or "message", "\n".join(data), last_id)
                event, data = "", []
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id" and "\0" not in value:
                last_id = value
            # comments (an empty name) and other fields (`retry`) mean nothing to this client


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
