"""The live API every test of this tier may share: one uvicorn process per test worker."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.api.live_server import Seed, ServerProcess, seed_database

# Small limits, so oversized uploads are cheap to make; many failed keys allowed, so a fuzzer
# guessing keys does not lock the key it holds out (429 is tested in tests/unit).
SERVER_ENV = {
    "CI_MAX_UPLOAD": "64KB",
    "CI_MAX_UNPACKED": "256KB",
    "CI_MAX_ENTRIES": "40",
    "CI_MAX_JOB_TIMEOUT": "3600",
    "CI_AUTH_FAILURES_PER_MINUTE": "1000000",
    "CI_SSE_KEEPALIVE": "1",
}


@dataclass(frozen=True)
class LiveApi:
    server: ServerProcess
    seed: Seed

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="session")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    workdir = tmp_path_factory.mktemp("live-api")
    db_path = workdir / "ci.db"
    seed = seed_database(db_path)
    server = ServerProcess.start(workdir, {**SERVER_ENV, "CI_DB_PATH": str(db_path)})
    try:
        yield LiveApi(server=server, seed=seed)
    finally:
        server.stop()
    # Catches what a test's own check could miss: a line logged after that test ended.
    assert "Traceback" not in server.log(), f"the server logged a traceback:\n{server.log()}"


@pytest.fixture
def api(live_api: LiveApi) -> Iterator[LiveApi]:
    """The live API; the test fails if the server logged a traceback while it ran."""
    live_api.server.new_log()
    yield live_api
    logged = live_api.server.new_log()
    assert "Traceback" not in logged, f"the server logged a traceback:\n{logged[-6000:]}"
