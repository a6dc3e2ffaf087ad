"""The FastAPI application: `create_app(settings, repository)`, and `app` for uvicorn.

    uvicorn ci_server.app:app      # settings from CI_* variables: SQLite, or PostgreSQL when
                                   # CI_DATABASE_URL is set

Importing this module opens nothing: the repository is opened and the event relay started in
the app's lifespan, and both are closed again when it ends. Replicas share no state but the
database, so any number of them can run side by side.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from ci_common.errors import CIError
from ci_common.repository import Repository
from ci_common.settings import Settings
from ci_persistence import open_repository
from ci_server.errors import install_error_handlers
from ci_server.gc_tuning import tune_for_serving
from ci_server.logs import log_beside_uvicorn
from ci_server.metrics import ServerMetrics
from ci_server.openapi import install_openapi
from ci_server.ratelimit import FailureLimiter
from ci_server.relay import EventRelay
from ci_server.routes import router
from ci_server.state import ServerState
from ci_server.web import install_web

logger = logging.getLogger(__name__)

TITLE = "CI service"
DESCRIPTION = (
    "Run a Python project's tests in a fresh container and stream the output live. "
    "Every endpoint but /health needs `Authorization: Bearer <API key>`; errors are "
    '`{"detail": "<one line>"}`.'
)


def create_app(settings: Settings, repository: Repository) -> FastAPI:
    """An app serving `repository`; the caller owns the repository and closes it."""
    return build_app(settings, lambda: repository, owns_repository=False)


def build_app(settings: Settings, open_repo: Callable[[], Repository],
              owns_repository: bool, on_start: Callable[[], None] | None = None,
              on_serve: Callable[[], None] | None = None) -> FastAPI:
    """An app that calls `open_repo` when its lifespan starts (and closes it if it owns it).

    `on_start`, if given, runs first, when serving begins rather than at import; `on_serve`
    once the repository and the relay are up, just before the first request.
    """
    state = ServerState(settings=settings,
                        limiter=FailureLimiter(settings.auth_failures_per_minute),
                        metrics=ServerMetrics(lambda: state.repository))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if on_start is not None:
            on_start()
        repository = await run_in_threadpool(open_repo)
        relay = EventRelay(repository, keepalive_s=settings.sse_keepalive_s)
        try:
            await relay.start()
            state.repository, state.relay = repository, relay
            if on_serve is not None:
                on_serve()
            yield
        finally:
            state.repository, state.relay = None, None
            await relay.stop()
            if owns_repository:
                repository.close()

    app = FastAPI(title=TITLE, description=DESCRIPTION, version="0.1.0", lifespan=lifespan)
    app.state.ci = state
    install_error_handlers(app)
    app.include_router(router)
    install_web(app)
    install_openapi(app, settings)
    return app


def app_from_env() -> FastAPI:
    """The app uvicorn serves: settings from the environment, the default repository, the
    server's log lines beside uvicorn's, and the collector tuned for serving (process-wide,
    so not in create_app, which tests call in their own process)."""
    settings = Settings.from_env()
    return build_app(settings, lambda: open_or_exit(settings), owns_repository=True,
                     on_start=log_beside_uvicorn, on_serve=tune_for_serving)


def open_or_exit(settings: Settings) -> Repository:
    """The repository; if the database cannot be opened, one line on stderr and exit 1.

    uvicorn would turn the failed lifespan into a traceback and exit 3; a database that is
    down or misnamed is an operator's problem, said in one line (the URL without its password)
    like every other command says it. Nothing is open yet, so exiting at once loses nothing.
    """
    try:
        return open_repository(settings)
    except (CIError, sqlite3.Error, OSError) as exc:
        reason = exc.message if isinstance(exc, CIError) else (
            f"cannot open the database {settings.db_path}: {exc}")
        sys.stderr.write(f"Error: {' '.join(reason.split())}\n")
        sys.stderr.flush()
        os._exit(exc.exit_code if isinstance(exc, CIError) else 1)


app = app_from_env()
