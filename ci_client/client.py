"""The HTTP client library behind the `ci` command.

`CIClient` speaks the API in docs/DESIGN.md over httpx, returns models from `ci_common.wire` and
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

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import httpx
from httpx_sse import connect_sse

from ci_client.config import parse_server_urls
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
from ci_common.models import JobStatus

# pydantic (the wire models, the events) is imported where an answer is parsed, not here:
# `ci submit test` sends its upload before paying for it (issue #10). Plain imports in the
# functions, not importlib's LazyLoader: this library may be used from several threads, and
# Python 3.11's LazyLoader is not thread-safe.
if TYPE_CHECKING:
    from pydantic import BaseModel

    from ci_client.events import JobStreamEvent
    from ci_common.wire import JobCreated, JobList, JobView

PAGE = 500  # the most jobs the server sends in one page

Since = Literal["start", "now"]
ModelT = TypeVar("ModelT", bound="BaseModel")

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


@dataclass(frozen=True, slots=True)
class _Position:
    """Where a stream starts: the id of the server's opening message, which has no data."""

    seq: int


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
    ) -> None:
        urls = parse_server_urls(server_urls) if isinstance(server_urls, str) else tuple(
            url.rstrip("/") for url in server_urls)
        if not urls:
            raise InvalidInput("no server URL given")
        self.server_urls: tuple[str, ...] = urls
        self.reconnect = reconnect or ReconnectPolicy()
        self._current = 0  # index of the URL that answered last
        self._sleep = sleep
        self._clock = clock
        timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self._http = httpx.Client(
            transport=transport,
            timeout=timeout,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "ci-client"},
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> CIClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------- requests
    def submit(self, archive_bytes: bytes, timeout: float | None = None,
               no_cache: bool = False) -> JobCreated:
        """Upload a packed project; the new job is queued (`no_cache`: install afresh)."""
        data = {} if timeout is None else {"timeout": repr(float(timeout))}
        if no_cache:
            data["no_cache"] = "true"
        files = {"archive": ("project.zip", archive_bytes, "application/zip")}
        response = self._request("POST", "/jobs", idempotent=False, files=files, data=data)
        from ci_common.wire import JobCreated

        return _parse(JobCreated, response)

    def list_jobs(self, limit: int = 50, offset: int = 0,
                  status: JobStatus | None = None) -> JobList:
        """One page of the caller's jobs (only those in `status`, if given), newest first."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status is not None:
            params["status"] = status.value
        from ci_common.wire import JobList

        return _parse(JobList, self._request("GET", "/jobs", params=params))

    def newest_jobs(self, count: int, status: JobStatus | None = None) -> JobList:
        """The caller's newest `count` jobs, fetched a server page (500) at a time."""
        from ci_common.wire import JobList

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
        from ci_common.wire import JobView

        return _parse(JobView, self._request("GET", f"/jobs/{job_id}", job_id=job_id))

    def cancel(self, job_id: str) -> JobView:
        """Ask for a job to be cancelled; returns the job as it is right after the request."""
        # Cancelling twice is harmless, so a request that may have been lost can be repeated.
        response = self._request("POST", f"/jobs/{job_id}/cancel", job_id=job_id)
        from ci_common.wire import JobView

        return _parse(JobView, response)

    def get_log(self, job_id: str, tail: int | None = None) -> str:
        """The job's output stored so far, as text (the last `tail` lines with tail)."""
        params = {} if tail is None else {"tail": tail}
        response = self._request("GET", f"/jobs/{job_id}/log", job_id=job_id, params=params)
        return response.text

    def _request(
        self, method: str, path: str, *, idempotent: bool = True, job_id: str | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send to the servers in turn until one answers; map error answers to CIError."""
        count = len(self.server_urls)
        last_response: httpx.Response | None = None
        for attempt in range(count):
            index = (self._current + attempt) % count
            base = self.server_urls[index]
            try:
                response = self._http.request(method, base + path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout):
                continue  # nothing reached the server: always safe to try the next one
            except httpx.TransportError as exc:
                if idempotent:
                    continue
                # The server may have acted on it (a job created); repeating could do it twice.
                raise ServerUnreachable(
                    f"lost the connection to the CI server at {base} ({_describe(exc)}); "
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
        from ci_client.events import EndEvent

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
            except httpx.TransportError as exc:
                failure = f"{_describe(exc)} from {base}"
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
        from ci_client.events import parse_event

        headers = {} if last_seq is None else {"Last-Event-ID": str(last_seq)}
        url = f"{base}/jobs/{job_id}/events"
        with connect_sse(self._http, "GET", url, params={"since": since}, headers=headers) as src:
            response = src.response
            if response.status_code >= 500:
                response.read()
                raise _StreamDropped(f"the CI server at {base} answered {response.status_code}")
            if not response.is_success:
                response.read()
                raise_for_status(response, job_id)
            content_type = response.headers.get("content-type", "")
            if not content_type.startswith("text/event-stream"):
                raise ServerError(
                    f"{base} did not answer with an event stream (got {content_type or 'nothing'})"
                    "; is it a CI server?"
                )
            for sse in src.iter_sse():
                event = parse_event(sse)
                if event is not None:
                    yield event
                elif not sse.data and sse.id.isascii() and sse.id.isdigit():
                    yield _Position(int(sse.id))


def raise_for_status(response: httpx.Response, job_id: str | None = None) -> None:
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


def error_detail(response: httpx.Response) -> str:
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


def _parse(model: type[ModelT], response: httpx.Response) -> ModelT:
    try:
        return model.model_validate(response.json())
    except ValueError as exc:  # pydantic's ValidationError is one
        raise ServerError(
            f"unexpected answer from the CI server ({response.status_code} "
            f"{response.request.method} {response.request.url.path}): not a {model.__name__}"
        ) from exc


def _describe(exc: httpx.TransportError) -> str:
    """A short name for a transport failure: `read timeout`, `connection refused`, …"""
    if isinstance(exc, httpx.TimeoutException):
        return "read timeout" if isinstance(exc, httpx.ReadTimeout) else "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "cannot connect"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "connection closed by the server"
    return type(exc).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())
