"""Fixtures for end-to-end tests: the runner image, the CA bundle, and isolated deployments."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.docker_proxy import DockerProxy
from tests.e2e.harness import REPO_ROOT, Deployment
from tests.postgres import PostgresServer


@pytest.fixture(scope="session")
def runner_image() -> str:
    """The runner image, provisioned by the project's own script (idempotent, fast when warm)."""
    result = subprocess.run([str(REPO_ROOT / "scripts" / "ensure-docker")], capture_output=True,
                            text=True, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"scripts/ensure-docker failed:\n{result.stderr[-2000:]}")
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def ca_bundle() -> str:
    """The host's CA bundle for job containers (scripts/host-ca-bundle decides, in one place)."""
    result = subprocess.run([str(REPO_ROOT / "scripts" / "host-ca-bundle")], capture_output=True,
                            text=True, timeout=30)
    if result.returncode != 0:
        pytest.fail(result.stderr.strip())
    return result.stdout.strip()


@pytest.fixture
def backend() -> str:
    """The deployment's database: "sqlite", unless a test parametrizes it (on_both_backends)."""
    return "sqlite"


@pytest.fixture
def deployment(request: pytest.FixtureRequest, tmp_path: Path, runner_image: str,
               ca_bundle: str | None, backend: str) -> Iterator[Deployment]:
    """A fresh deployment (nothing started yet); everything it starts is torn down after.

    On "postgres" its database is a new one on the session's throwaway server (asked for only
    then, so SQLite-only runs never start PostgreSQL), dropped afterwards.
    """
    server: PostgresServer | None = None
    database: str | None = None
    if backend == "postgres":
        server = request.getfixturevalue("postgres_server")
        database = server.create_database()
    elif backend != "sqlite":
        raise ValueError(f"unknown backend {backend!r}")
    dep = Deployment(workdir=tmp_path, runner_image=runner_image, ca_bundle=ca_bundle,
                     database_url=server.url(database) if server and database else None)
    try:
        yield dep
    finally:
        dep.close()
        if server is not None and database is not None:
            server.drop_database(database)


@pytest.fixture
def proxy() -> Iterator[DockerProxy]:
    """A proxy in front of the Docker engine that a test can cut (an engine outage)."""
    proxy = DockerProxy().start()
    try:
        yield proxy
    finally:
        proxy.close()
        shutil.rmtree(proxy.socket_path.parent, ignore_errors=True)
