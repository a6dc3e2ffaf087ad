"""Job events as Server-Sent Events bytes, each encoded once for every watcher.

A thousand watchers of one job receive the same bytes for each event, so the relay encodes an
event when it first meets it and keeps the result in a small cache keyed by (job, seq); history
reads of watchers that join later find it there too. Bytes are what FastAPI's SSE responses
write (`fastapi.sse.format_sse_event`), so the wire format is unchanged.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

from fastapi.sse import format_sse_event

from ci_common.models import EventKind, JobEvent, JobStatus, OutputStream
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

# Events kept encoded: enough for every line a busy replica relays in the time a joining
# watcher needs to read its history; older ones are simply encoded again.
CACHE_EVENTS = 20_000


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    """One event ready for the wire: its seq (to skip duplicates), whether it ends the stream."""

    seq: int | None  # None: not a stored event (a queue position), always sent, no id
    is_end: bool
    data: bytes


class EncodedBatch(list[EncodedEvent]):
    """Stored events the relay hands to every watcher of a job at once, with their bytes
    joined once for all of them (read-only once built).

    `whole` is set when the batch can go out as one piece to a watcher that has sent nothing
    past its first seq: seqs strictly increasing, no queue position, END (if any) last. A
    thousand watchers then each write the same bytes instead of each filtering and joining
    the same events.
    """

    whole: bytes | None
    first_seq: int
    last_seq: int

    def __init__(self, events: list[EncodedEvent]) -> None:
        super().__init__(events)
        self.whole = None
        self.first_seq = self.last_seq = 0
        previous = None
        for index, event in enumerate(events):
            if event.seq is None or (previous is not None and event.seq <= previous) \
                    or (event.is_end and index != len(events) - 1):
                return
            previous = event.seq
        if events:
            self.first_seq, self.last_seq = events[0].seq or 0, events[-1].seq or 0
            self.whole = b"".join(event.data for event in events)


def encode(event: JobEvent) -> EncodedEvent:
    """A stored event as it goes on the wire (see ci_common.wire)."""
    payload: StatusData | OutputData | EndData
    if event.kind is EventKind.STATUS:
        payload, name = StatusData(status=JobStatus(event.text)), SSE_EVENT_STATUS
    elif event.kind is EventKind.OUTPUT:
        payload = OutputData(stream=event.stream or OutputStream.STDOUT, text=event.text)
        name = SSE_EVENT_OUTPUT
    else:
        payload, name = EndData.model_validate(json.loads(event.text)), SSE_EVENT_END
    data = format_sse_event(data_str=payload.model_dump_json(), event=name, id=str(event.seq))
    return EncodedEvent(seq=event.seq, is_end=event.kind is EventKind.END, data=data)


def encode_position(ahead: int | None) -> EncodedEvent:
    """A queue position on the wire: no id, so Last-Event-ID stays on the stored events."""
    data = format_sse_event(data_str=QueueData(ahead=ahead).model_dump_json(),
                            event=SSE_EVENT_QUEUE)
    return EncodedEvent(seq=None, is_end=False, data=data)


def comment(text: str, event_id: int | None = None) -> bytes:
    """A comment-only message (keep-alive, or the stream's opening line with its resume id)."""
    return format_sse_event(comment=text, id=None if event_id is None else str(event_id))


class EncodingCache:
    """The last CACHE_EVENTS encoded events, by (job id, seq); used from the event loop only."""

    def __init__(self, size: int = CACHE_EVENTS) -> None:
        self._size = size
        # The event is kept beside its bytes: the log cap rewrites one stored event in place
        # (its marker), so a hit must also match the text.
        self._items: OrderedDict[tuple[str, int], tuple[JobEvent, EncodedEvent]] = OrderedDict()
        self.encoded = 0  # events actually encoded (tests check each is encoded once)

    def get(self, event: JobEvent) -> EncodedEvent:
        key = (event.job_id, event.seq)
        hit = self._items.get(key)
        if hit is not None and hit[0].text == event.text and hit[0].kind is event.kind \
                and hit[0].stream is event.stream:
            return hit[1]
        found = encode(event)
        self.encoded += 1
        self._items[key] = (event, found)
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return found
