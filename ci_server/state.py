"""What one server replica holds while it runs, and the dependencies that hand it to routes."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from ci_common.repository import Repository
from ci_common.settings import Settings
from ci_server.errors import NotStarted
from ci_server.metrics import ServerMetrics
from ci_server.ratelimit import FailureLimiter
from ci_server.relay import EventRelay


@dataclass(slots=True)
class ServerState:
    """Settings, limiter and metrics from create_app; repository and relay once started."""

    settings: Settings
    limiter: FailureLimiter
    metrics: ServerMetrics
    repository: Repository | None = None
    relay: EventRelay | None = field(default=None)


def get_state(request: Request) -> ServerState:
    state = request.app.state.ci
    assert isinstance(state, ServerState)
    return state


def get_settings(request: Request) -> Settings:
    return get_state(request).settings


def get_repository(request: Request) -> Repository:
    repository = get_state(request).repository
    if repository is None:
        raise NotStarted()
    return repository


def get_relay(request: Request) -> EventRelay:
    relay = get_state(request).relay
    if relay is None:
        raise NotStarted()
    return relay


# The same as a dependency, as a coroutine: FastAPI runs a plain function dependency in the
# threadpool, a hop that costs more than what it returns.
async def repository_dependency(request: Request) -> Repository:
    return get_repository(request)
