"""The HTTP endpoints (see docs/DESIGN.md): thin wrappers over the repository and the relay.

Blocking repository calls run in the threadpool: sync endpoints and dependencies are run there
by FastAPI, async ones hand their calls over with run_in_threadpool.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from ci_common.errors import NotFound
from ci_common.models import Job, JobStatus
from ci_common.repository import MAX_STORED_INT, Repository
from ci_common.wire import ErrorBody, JobCreated, JobList, JobView, ServiceInfo
from ci_server.archive import ArchiveLimits, validate_archive
from ci_server.auth import CurrentUser, bearer_scheme, current_user
from ci_server.events import Opening, ResumePoint, Since, opening, resume_point, stream_events
from ci_server.joblog import last_lines, output_text, stored_events
from ci_server.junit import missing_junit_reason
from ci_server.relay import EventRelay, Subscription
from ci_server.state import (
    get_relay,
    get_repository,
    get_settings,
    get_state,
    repository_dependency,
)
from ci_server.stream_response import EventStreamResponse
from ci_server.upload import read_submission

MAX_PAGE = 500
SSE_MEDIA_TYPE = "text/event-stream"
# One event of the stream, as FastAPI describes an SSE item (OpenAPI 3.2 `itemSchema`).
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                   "id": {"type": "string"}, "retry": {"type": "integer", "minimum": 0}},
}


def error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


def json_errors(responses: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """The same error responses, spelled out as JSON for a route whose own media type is not.

    FastAPI would document a `model` under the route's media type (text/event-stream), but
    errors are answered before the stream starts, as JSON.
    """
    ref = {"$ref": "#/components/schemas/ErrorBody"}  # registered by the other routes
    return {code: {"description": spec["description"],
                   "content": {"application/json": {"schema": ref}}}
            for code, spec in responses.items()}


AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: error("missing, malformed, unknown or revoked API key, or deactivated user"),
    422: error("a parameter is not valid"),
    429: error("too many bad API keys from this address; see Retry-After"),
}
JOB_ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_ERRORS,
    404: error("no such job, or another user's job"),
}

RepositoryDep = Annotated[Repository, Depends(repository_dependency)]
router = APIRouter()


def owned_job(job_id: str, user: CurrentUser, repository: RepositoryDep) -> Job:
    """The caller's job; another user's job is a 404 exactly like a missing one."""
    return repository.get_job(job_id, user_id=user.id)


OwnedJob = Annotated[Job, Depends(owned_job)]


@router.get("/health", tags=["service"], summary="Liveness check (no authentication)")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/info", response_model=ServiceInfo, tags=["service"],
            summary="What a submission may choose: Python versions (no authentication)")
def info(request: Request) -> ServiceInfo:
    images = get_settings(request).python_images()
    return ServiceInfo(python_versions=list(images.versions), default_python=images.default)


# No key: Prometheus scrapes without one. Nothing in it is per user; keep it off public networks.
@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text format (see ci_server/metrics.py); sync: the collector reads the DB."""
    return Response(generate_latest(get_state(request).metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)


@router.post(
    "/jobs",
    status_code=201,
    response_model=JobCreated,
    tags=["jobs"],
    summary="Submit a zip of a project to run its tests",
    # The body is read by hand after authentication; ci_server.openapi documents it.
    responses={**AUTH_ERRORS,
               400: error("not a safe zip of a project (src/, tests/, requirements.txt)"),
               413: error("the archive is over the upload limit")},
)
async def submit_job(request: Request, user: CurrentUser, repository: RepositoryDep) -> JobCreated:
    settings = get_settings(request)
    submission = await read_submission(request, settings)
    await run_in_threadpool(validate_archive, submission.archive,
                            ArchiveLimits.from_settings(settings))
    job = await run_in_threadpool(
        lambda: repository.create_job(user.id, submission.archive, submission.timeout_seconds,
                                      pytest_args=submission.pytest_args,
                                      python_version=submission.python_version,
                                      no_cache=submission.no_cache))
    return JobCreated(id=job.id, status=job.status)


@router.get("/jobs", response_model=JobList, tags=["jobs"],
            summary="The caller's jobs, newest first", responses=AUTH_ERRORS)
def list_jobs(
    user: CurrentUser,
    repository: RepositoryDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_STORED_INT)] = 0,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
) -> JobList:
    jobs = repository.list_jobs(user.id, limit=limit, offset=offset, status=status)
    return JobList(jobs=[JobView.from_job(job) for job in jobs],
                   total=repository.count_jobs(user.id, status=status), limit=limit,
                   offset=offset)


@router.get("/jobs/{job_id}", response_model=JobView, tags=["jobs"], summary="One job",
            responses=JOB_ERRORS)
def get_job(job: OwnedJob) -> JobView:
    return JobView.from_job(job)


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=JobView, tags=["jobs"],
             summary="Ask for a job to be cancelled", responses=JOB_ERRORS)
def cancel_job(job_id: str, user: CurrentUser, repository: RepositoryDep) -> JobView:
    return JobView.from_job(repository.request_cancel(job_id, user.id))


MAX_TAIL = 1_000_000


@router.get("/jobs/{job_id}/log", response_class=PlainTextResponse, tags=["jobs"],
            summary="A job's stored output as plain text, as far as it goes (not following)",
            responses=json_errors(JOB_ERRORS))
def job_log(
    job: OwnedJob,
    repository: RepositoryDep,
    tail: Annotated[int | None, Query(ge=1, le=MAX_TAIL,
                                      description="only the last N lines")] = None,
) -> PlainTextResponse:
    text = output_text(stored_events(repository, job.id))
    return PlainTextResponse(text if tail is None else last_lines(text, tail))


@router.get("/jobs/{job_id}/junit", tags=["jobs"],
            summary="pytest's JUnit XML report of a finished job",
            response_class=Response,
            responses={200: {"content": {"application/xml": {}},
                             "description": "the report as pytest wrote it"},
                       **json_errors({**JOB_ERRORS,
                                      404: error("no such job, another user's job, or a job "
                                                 "without a report (the detail says why)")})})
def job_junit(job: OwnedJob, repository: RepositoryDep) -> Response:
    try:
        xml = repository.get_junit(job.id)
    except NotFound:
        raise NotFound(missing_junit_reason(job)) from None
    return Response(xml, media_type="application/xml")


async def resume(
    since: Annotated[Since, Query(description="where to start without Last-Event-ID")] =
    Since.START,
    last_event_id: Annotated[str | None, Header(
        description="resume after this event id (wins over `since`)")] = None,
) -> ResumePoint:
    """The parameters as FastAPI documents and validates them (422 for a bad `since`); the
    stream itself reads them with asked_resume, after the ownership check."""
    return resume_point(since, last_event_id)


def asked_resume(request: Request) -> ResumePoint | None:
    """`resume` from the raw request, or None for a `since` that is no Since (the route's
    `resume` dependency then answers 422); InvalidInput (400) for a bad Last-Event-ID."""
    try:
        since = Since(request.query_params.get("since", Since.START))
    except ValueError:
        return None
    return resume_point(since, request.headers.get("last-event-id"))


@dataclass(frozen=True, slots=True)
class OpenStream:
    """A registered subscription, where its stream starts, and its first history page."""

    subscription: Subscription
    start: ResumePoint
    opened: Opening


async def open_job_stream(request: Request, job_id: str,
                          credentials: HTTPAuthorizationCredentials | None,
                          repository: Repository, relay: EventRelay) -> OpenStream | None:
    """Everything blocking a stream needs before it starts, in one threadpool hop, in the
    order the sync dependencies would run (a thousand watchers joining at once paid more for
    hops, thread wake-ups queueing for the GIL, than for the queries): authentication,
    ownership (another user's job is a 404 whatever else is wrong with the request), the
    resume point (400; a bad `since` yields None, which EventsRoute never passes on),
    registering with the relay (step 1 of ci_server.events), then the stream's start and
    first history page. The caller removes the subscription when the stream ends."""
    def open_stream() -> OpenStream | None:
        job = owned_job(job_id, current_user(request, credentials), repository)
        start = asked_resume(request)
        if start is None:
            return None
        subscription = relay.add_subscriber(job.id)
        try:
            return OpenStream(subscription, start, opening(repository, job.id, start))
        except BaseException:
            relay.remove_subscriber(subscription)
            raise

    return await run_in_threadpool(open_stream)


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event_stream_response(repository: Repository, relay: EventRelay, stream: OpenStream,
                          on_close: Callable[[], None]) -> EventStreamResponse:
    # Bytes encoded once per event for every watcher (ci_server.sse), several events per
    # write; FastAPI's per-item SSE encoding would cost each watcher a task hop per event.
    return EventStreamResponse(
        stream_events(repository, relay, stream.subscription, stream.start, stream.opened),
        media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS, on_close=on_close)


async def job_events(
    # Ownership first: another user's job is a 404 whatever else is wrong with the request.
    job: OwnedJob,
    start: Annotated[ResumePoint, Depends(resume)],  # documents and validates; see above
) -> EventStreamResponse:
    """The route as FastAPI documents and validates it. EventsRoute streams every request
    whose `since` is valid (or absent) itself, so FastAPI runs this route only for one that
    is not, and answers it before the body: 401 or 404 from OwnedJob, else `resume`'s 422."""
    raise AssertionError("EventsRoute streams every request with a valid `since`")


SINCE_VALUES = frozenset(Since)


class EventsRoute(APIRoute):
    """The events route, answering a request whose `since` is valid (or absent) without
    FastAPI's dependency solving: with a thousand watchers joining, solving the route's
    dependencies (their exit stack, parameter validation) was about a sixth of the replica's
    CPU. The same steps in the same order (bearer credentials,
    repository, relay, then open_job_stream), so the same errors with the same answers; a bad
    `since` goes the documented way (job_events), whose 422 FastAPI writes."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        documented = super().get_route_handler()

        async def handler(request: Request) -> Response:
            since = request.query_params.get("since")
            if since is not None and since not in SINCE_VALUES:
                return await documented(request)
            credentials = await bearer_scheme(request)
            repository = get_repository(request)
            relay = get_relay(request)
            watchers = get_state(request).metrics.sse_watchers
            stream = await open_job_stream(request, request.path_params["job_id"],
                                           credentials, repository, relay)
            assert stream is not None  # `since` was checked above

            def close() -> None:
                relay.remove_subscriber(stream.subscription)
                watchers.dec()

            watchers.inc()
            return event_stream_response(repository, relay, stream, on_close=close)

        return handler


router.add_api_route(
    "/jobs/{job_id}/events",
    job_events,
    methods=["GET"],
    route_class_override=EventsRoute,
    # Not EventSourceResponse: FastAPI would then encode every item itself (see above).
    response_class=EventStreamResponse,
    tags=["jobs"],
    summary="Stream a job's events (status, output, end) as Server-Sent Events",
    description="Every event has `id: <seq>`; the stream closes after the `end` event, which a "
                "finished job always sends, even to a client that has seen everything else.",
    responses=json_errors({**JOB_ERRORS, 400: error("Last-Event-ID is not an event id")})
    | {200: {"content": {SSE_MEDIA_TYPE: {"itemSchema": SSE_EVENT_SCHEMA}}}},
)
