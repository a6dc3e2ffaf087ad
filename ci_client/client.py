"""The HTTP client library behind the `ci` command.

`CIClient` speaks the API in docs/DESIGN.md over HTTP (requests and the event stream through
the transport seam of `ci_client.transport`), returns the client's models of the
answers (`ci_client.wire`, which a contract test holds to the server's `ci_common.wire`) and
raises errors from `ci_common.errors`:

    401 → AuthenticationError (the server's detail: invalid, revoked, deactivated)
    404 → NotFound("job <id> not found")      409 → Conflict        413 → TooLarge (detail as is)
    429 → RateLimited      400/422 → InvalidInput      other → ServerError
    no server answers → ServerUnreachable("cannot reach the CI server at …")

Several server URLs (replicas) may be given: a request that cannot connect moves on to the next
one, and the URL that last answered is tried first next time. `stream_events` reconnects by
itself when the stream drops (see ReconnectPolicy) and never yields an event twice.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlencode

from ci_client.config import parse_server_urls
from ci_client.transport import (
    Answer,
    ConnectFailed,
    PlainTransport,
    Transport,
    TransportError,
    choose_plain,
    encode_multipart,
)
from ci_client.wire import JobCreated, JobList, JobView
from ci_common.errors import (
    AuthenticationError,
    CIError,
    Conflict,
    InvalidInput,
    NotFound,
    RateLimited,
    ServerError,
    ServerUnreachable,
    TooLarge,
)
from ci_common.statuses import JobStatus

# httpx is imported in the functions that need it, not here: plain http requests and event
# streams do without it (issue #10; see ci_client.transport). Plain imports in functions, not
# importlib's LazyLoader: this library may be used from several threads, and Python 3.11's
# LazyLoader is not thread-safe.
if TYPE_CHECKING:
    import httpx

    from ci_client.events import JobStreamEvent

PAGE = 500  # the most jobs the server sends in one page

Since = Literal["start", "now"]
T = TypeVar("T")

# Longer than the server's SSE keep-alive interval (CI_SSE_KEEPALIVE, 15 s by default), so a
# quiet but healthy stream never times out, while a dead one is noticed within a minute.
DEFAULT_READ_TIMEOUT_S = 45.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
# Proxies in front of a restarting replica answer these; another replica may do better.
_RETRYABLE_STATUS = frozenset({502, 503, 504})


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """How `stream_events` reconnects: exponential backoff, bounded by time without progress."""

    initial_delay_s: float = 0.1
    max_delay_s: float = 2.0
    give_up_after_s: float = 60.0  # counted from the last event received (or the first try)

    def next_delay(self, delay: float) -> float:
        """The delay after `delay`: doubled, capped at max_delay_s."""
        return min(delay * 2, self.max_delay_s)


class _StreamDropped(Exception):
    """The event stream broke in a way a reconnect may fix (internal to stream_events)."""


class _Position:
    """Where a stream starts: the id of the server's opening message, which has no data."""

    # A plain class, not a dataclass: making a frozen dataclass costs each `ci` start about
    # half a millisecond, and this one is internal to stream_events.
    __slots__ = ("seq",)

    def __init__(self, seq: int) -> None:
        self.seq = seq


class CIClient:
    """A client for one CI service reachable at one or more server URLs."""

    def __init__(
        self,
        server_urls: Sequence[str] | str,
        api_key: str,
        transport: httpx.BaseTransport | None = None,
        *,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        reconnect: ReconnectPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """`transport`: an httpx transport for every request (tests); `environ`: where httpx
        would look for proxies (None: os.environ), which decides whether plain requests may
        skip httpx (see ci_client.transport.choose_plain)."""
        urls = parse_server_urls(server_urls) if isinstance(server_urls, str) else tuple(
            url.rstrip("/") for url in server_urls)
        if not urls:
            raise InvalidInput("no server URL given")
        self.server_urls: tuple[str, ...] = urls
        self.reconnect = reconnect or ReconnectPolicy()
        self._current = 0  # index of the URL that answered last
        self._sleep = sleep
        self._clock = clock
        self._headers = {"Authorization": f"Bearer {api_key}", "User-Agent": "ci-client"}
        self._transport = transport
        self._read_timeout_s = read_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._plain: PlainTransport | None = None
        if transport is None and choose_plain(urls, os.environ if environ is None else environ):
            self._plain = PlainTransport(connect_timeout_s, read_timeout_s)
        self._http: httpx.Client | None = None  # created on first use: the import is costly
        self._http_lock = threading.Lock()

    def close(self) -> None:
        """Close the connection pools."""
        if self._plain is not None:
            self._plain.close()
        if self._http is not None:
            self._http.close()

    def _httpx(self) -> httpx.Client:
        """The httpx client (created once), for what PlainTransport cannot send (https,
        proxies, test transports); its SSL context is made here, so only when httpx is
        needed."""
        with self._http_lock:
            if self._http is None:
                import httpx

                verify: Any = True  # httpx's default: certifi's CA bundle, loaded here
                if self._plain is not None:
                    import ssl

                    # Plain http and no proxy: this client never speaks TLS. A context that
                    # trusts no CA costs nothing to make (the default loads a CA bundle, tens
                    # of ms) and would refuse any TLS peer rather than accept one.
                    verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                self._http = httpx.Client(
                    transport=self._transport,
                    timeout=httpx.Timeout(self._read_timeout_s, connect=self._connect_timeout_s),
                    headers=self._headers,
                    verify=verify,
                )
            return self._http

    def _sender(self) -> Transport:
        if self._plain is not None:
            return self._plain
        from ci_client.httpx_transport import HttpxTransport

        return HttpxTransport(self._httpx())

    def __enter__(self) -> CIClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------- requests
    def submit(self, archive_bytes: bytes, timeout: float | None = None, *,
               pytest_args: Sequence[str] = (), python: str | None = None,
               no_cache: bool = False) -> JobCreated:
        """Upload a packed project; the new job is queued (`no_cache`: install afresh)."""
        data = {} if timeout is None else {"timeout": repr(float(timeout))}
        if no_cache:
            data["no_cache"] = "true"
        if pytest_args:
            from ci_common.pytest_args import pytest_args_to_json

            data["pytest_args"] = pytest_args_to_json(pytest_args)
        if python is not None:
            data["python"] = python
        body, content_type = encode_multipart(
            data, {"archive": ("project.zip", archive_bytes, "application/zip")})
        response = self._request("POST", "/jobs", idempotent=False, body=body,
                                 content_type=content_type)
        return _parse(JobCreated.from_json, "JobCreated", response)

    def list_jobs(self, limit: int = 50, offset: int = 0,
                  status: JobStatus | None = None) -> JobList:
        """One page of the caller's jobs (only those in `status`, if given), newest first."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status is not None:
            params["status"] = status.value
        return _parse(JobList.from_json, "JobList", self._request("GET", "/jobs", params=params))

    def newest_jobs(self, count: int, status: JobStatus | None = None) -> JobList:
        """The caller's newest `count` jobs, fetched a server page (500) at a time."""
        jobs: list[JobView] = []
        page = self.list_jobs(limit=min(count, PAGE), status=status)
        jobs.extend(page.jobs)
        while len(jobs) < count and len(page.jobs) == page.limit:
            page = self.list_jobs(limit=min(count - len(jobs), PAGE), offset=len(jobs),
                                  status=status)
            jobs.extend(page.jobs)
        return JobList(jobs=jobs, total=page.total, limit=count, offset=0)

    def get_job(self, job_id: str) -> JobView:
        """One job; NotFound when it is missing or someone else's."""
        response = self._request("GET", f"/jobs/{job_id}", job_id=job_id)
        return _parse(JobView.from_json, "JobView", response)

    def cancel(self, job_id: str) -> JobView:
        """Ask for a job to be cancelled; returns the job as it is right after the request."""
        # Cancelling twice is harmless, so a request that may have been lost can be repeated.
        response = self._request("POST", f"/jobs/{job_id}/cancel", job_id=job_id)
        return _parse(JobView.from_json, "JobView", response)

    def get_log(self, job_id: str, tail: int | None = None) -> str:
        """The job's output stored so far, as text (the last `tail` lines with tail)."""
        params = {} if tail is None else {"tail": tail}
        response = self._request("GET", f"/jobs/{job_id}/log", job_id=job_id, params=params)
        return response.text

    def get_junit(self, job_id: str) -> bytes:
        """The job's JUnit XML; NotFound saying why when it has none (or is not the caller's)."""
        # No job_id: the server's 404 detail says why there is no report (it says "job … not
        # found" itself for a missing or foreign job).
        return self._request("GET", f"/jobs/{job_id}/junit").content

    def _request(
        self, method: str, path: str, *, idempotent: bool = True, job_id: str | None = None,
        params: Mapping[str, Any] | None = None, body: bytes | None = None,
        content_type: str | None = None,
    ) -> Answer:
        """Send to the servers in turn until one answers; map error answers to CIError."""
        count = len(self.server_urls)
        last_response: Answer | None = None
        target = path + (f"?{urlencode(params)}" if params else "")
        headers = dict(self._headers)
        if content_type is not None:
            headers["Content-Type"] = content_type
        sender = self._sender()
        for attempt in range(count):
            index = (self._current + attempt) % count
            base = self.server_urls[index]
            try:
                response = sender.send(method, base + target, headers, body)
            except ConnectFailed:
                continue  # nothing reached the server: always safe to try the next one
            except TransportError as exc:
                if idempotent:
                    continue
                # The server may have acted on it (a job created); repeating could do it twice.
                raise ServerUnreachable(
                    f"lost the connection to the CI server at {base} ({exc.description}); "
                    "the request may or may not have been carried out (check `ci list`)"
                ) from exc
            if idempotent and response.status_code in _RETRYABLE_STATUS and attempt + 1 < count:
                last_response = response
                continue
            self._current = index
            raise_for_status(response, job_id)
            return response
        if last_response is not None:
            raise_for_status(last_response, job_id)
        raise ServerUnreachable(unreachable_message(self.server_urls))

    # ----------------------------------------------------------------- events
    def stream_events(
        self, job_id: str, since: Since = "start"
    ) -> Generator[JobStreamEvent, None, None]:
        """The job's events from `since` until its END event, each exactly once.

        When the stream drops (connection refused or reset, read timeout, 5xx, a stream that
        ends before END) it reconnects with `Last-Event-ID`, backing off and rotating through
        the server URLs, and gives up with ServerUnreachable after `give_up_after_s` without a
        new event. Authentication errors and NotFound are raised at once.
        """
        from ci_client.events import EndEvent, QueueEvent

        policy = self.reconnect
        last_seq: int | None = None
        opened_after: int | None = None  # where the first stream began, per the server
        delay = policy.initial_delay_s
        give_up_at = self._clock() + policy.give_up_after_s
        index = self._current
        while True:
            base = self.server_urls[index]
            try:
                resume_after = last_seq if last_seq is not None else opened_after
                for event in self._stream_once(base, job_id, since, resume_after):
                    if isinstance(event, _Position):
                        # A `since=now` stream that drops before its first event resumes here.
                        if opened_after is None:
                            opened_after = event.seq
                        continue
                    if isinstance(event, QueueEvent):
                        yield event  # no seq: nothing to resume from or deduplicate
                        continue
                    if last_seq is not None and event.seq <= last_seq:
                        continue  # replayed after a reconnect: already shown
                    last_seq = event.seq
                    self._current = index
                    delay = policy.initial_delay_s
                    give_up_at = self._clock() + policy.give_up_after_s
                    yield event
                    if isinstance(event, EndEvent):
                        return
                failure = f"the stream from {base} ended before the job did"
            except _StreamDropped as exc:
                failure = str(exc)
            except TransportError as exc:  # ConnectFailed too
                failure = f"{exc.description} from {base}"
            if self._clock() + delay > give_up_at:
                raise ServerUnreachable(
                    f"lost the event stream of job {job_id} ({failure}) and could not resume it "
                    f"for {policy.give_up_after_s:g} s; `ci wait {job_id}` picks up from here"
                )
            self._sleep(delay)
            delay = policy.next_delay(delay)
            index = (index + 1) % len(self.server_urls)

    def _stream_once(
        self, base: str, job_id: str, since: Since, last_seq: int | None
    ) -> Iterator[JobStreamEvent | _Position]:
        """One connection's worth of events (possibly replaying some already seen)."""
        from ci_client.events import iter_sse, parse_event

        headers = {**self._headers, "Accept": "text/event-stream", "Cache-Control": "no-store"}
        if last_seq is not None:
            headers["Last-Event-ID"] = str(last_seq)
        url = f"{base}/jobs/{job_id}/events?{urlencode({'since': since})}"
        with self._sender().stream("GET", url, headers) as response:
            if response.status_code >= 500:
                raise _StreamDropped(f"the CI server at {base} answered {response.status_code}")
            if not 200 <= response.status_code < 300:
                raise_for_status(response.read(), job_id)
            content_type = response.headers.get("content-type", "")
            if not content_type.startswith("text/event-stream"):
                raise ServerError(
                    f"{base} did not answer with an event stream (got {content_type or 'nothing'})"
                    "; is it a CI server?"
                )
            for sse in iter_sse(response.iter_bytes()):
                event = parse_event(sse)
                if event is not None:
                    yield event
                elif not sse.data and sse.id.isascii() and sse.id.isdigit():
                    yield _Position(int(sse.id))


def raise_for_status(response: Answer, job_id: str | None = None) -> None:
    """Raise the CIError matching an error answer; do nothing for a success."""
    if response.is_success:
        return
    status = response.status_code
    detail = error_detail(response)
    error: CIError
    if status == 401 or status == 403:
        error = AuthenticationError(detail or None)
    elif status == 404:
        error = NotFound(f"job {job_id} not found" if job_id else detail or None)
    elif status == 409:
        error = Conflict(detail or None)
    elif status == 413:
        error = TooLarge(detail or "the project archive is over the server's upload limit")
    elif status == 429:
        error = RateLimited(detail or None)
    elif status in (400, 422):
        error = InvalidInput(detail or None)
    else:
        suffix = f": {detail}" if detail else ""
        error = ServerError(f"the CI server answered {status}{suffix}")
    raise error


def error_detail(response: Answer) -> str:
    """The one-line `detail` of an error answer (FastAPI validation lists joined), or ''."""
    try:
        body = response.json()
    except ValueError:
        return _one_line(response.text[:200])
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return _one_line(detail)
    if isinstance(detail, list):  # FastAPI's request validation errors
        parts = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                parts.append(f"{where}: {item.get('msg', '')}" if where else str(item.get("msg")))
        return _one_line("; ".join(parts))
    return ""


def unreachable_message(urls: Sequence[str]) -> str:
    """`cannot reach the CI server at http://… (is it running?)`."""
    return f"cannot reach the CI server at {', '.join(urls)} (is it running?)"


def _parse(decode: Callable[[object], T], what: str, response: Answer) -> T:
    try:
        return decode(response.json())
    except ValueError as exc:  # json.JSONDecodeError and the decoders' errors
        raise ServerError(
            f"unexpected answer from the CI server ({response.status_code} "
            f"{response.method} {response.path}): not a {what} ({exc})"
        ) from exc


def _one_line(text: str) -> str:
    return " ".join(text.split())
