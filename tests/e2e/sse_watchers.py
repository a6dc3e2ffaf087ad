"""A bare, cheap SSE client for tests and benchmarks with many watchers of one job.

Each watcher is one asyncio socket speaking HTTP/1.1 (no httpx: with a thousand of them the
client, not the server, would be what is measured). It keeps the raw messages and parses them
only when asked, after the stream ended; watchers with `timed=True` also note when each chunk
arrived, for line latency.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

Event = tuple[int, str, str]  # (id, event name, text of an output event or the raw data)


@dataclass
class Watcher:
    """What one SSE client received."""

    since: str
    timed: bool = False
    raw: list[tuple[float, bytes]] = field(default_factory=list)  # (arrival, chunk)
    error: str | None = None
    live: asyncio.Event = field(default_factory=asyncio.Event)  # the first bytes arrived
    ended: bool = False

    def events(self) -> list[Event]:
        """Every event received, in order (comments left out)."""
        return [event for _, event in self._parsed()]

    def latencies_ms(self) -> list[float]:
        """For lines `line <n> <unix time>`: milliseconds from that time to their arrival."""
        found = []
        for arrived, (_, name, text) in self._parsed():
            if name != "output":
                continue
            for line in text.splitlines():
                words = line.split()
                if len(words) == 3 and words[0].endswith("line"):
                    found.append((arrived - float(words[2])) * 1000)
        return found

    def _parsed(self) -> list[tuple[float, Event]]:
        found = []
        for arrived, chunk in self.raw:
            for message in chunk.split(b"\n\n"):
                fields: dict[str, str] = {}
                for line in message.decode().split("\n"):
                    name, _, value = line.partition(": ")
                    fields[name] = value
                if "event" not in fields:
                    continue
                data = fields["data"]
                text = json.loads(data)["text"] if fields["event"] == "output" else data
                found.append((arrived, (int(fields["id"]), fields["event"], text)))
        return found


async def watch(url: str, key: str, job_id: str, watcher: Watcher) -> None:
    """Read the job's event stream until its end event (errors are recorded, not raised)."""
    parts = urlsplit(url)
    try:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write((f"GET /jobs/{job_id}/events?since={watcher.since} HTTP/1.1\r\n"
                      f"Host: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
                      "Accept: text/event-stream\r\nConnection: close\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
        if b"transfer-encoding: chunked" not in head.lower():
            raise RuntimeError("expected a chunked stream")
        pending = b""  # bytes of an SSE message split across chunks
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                break
            data = (await reader.readexactly(size + 2))[:-2]
            watcher.live.set()
            pending += data
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                continue
            whole, pending = pending[:cut + 2], pending[cut + 2:]
            watcher.raw.append((time.time() if watcher.timed else 0.0, whole))
            if b"\nevent: end\n" in b"\n" + whole:  # a field line: data is one JSON line
                watcher.ended = True
                writer.close()
                return
        raise RuntimeError("the stream ended without an end event")
    except Exception as exc:
        watcher.error = f"{type(exc).__name__}: {exc}"
        watcher.live.set()


def problems(watchers: list[Watcher], reference: list[Event]) -> list[str]:
    """Watchers whose events are not exactly the stored ones after their start, in order:
    all of them from `since=start`, every one from the first received for `since=now`."""
    found = []
    for index, watcher in enumerate(watchers):
        if watcher.error:
            found.append(f"watcher {index} ({watcher.since}): {watcher.error}")
            continue
        got = watcher.events()
        first = got[0][0] if got else None
        expected = reference if watcher.since == "start" else [
            event for event in reference if first is not None and event[0] >= first]
        if got != expected or not got or got[-1][1] != "end":
            found.append(f"watcher {index} ({watcher.since}): {len(got)} events, expected "
                         f"{len(expected)} (first id {first})")
    return found


async def reference_events(url: str, key: str, job_id: str) -> list[Event]:
    """The job's stored events, read from the start once it ended."""
    watcher = Watcher("start")
    await watch(url, key, job_id, watcher)
    if watcher.error:
        raise RuntimeError(f"reading the reference stream failed: {watcher.error}")
    return watcher.events()
