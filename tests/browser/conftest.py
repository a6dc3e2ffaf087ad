"""Fixtures for browser tests: Debian's chromium driven by Playwright, against real deployments.

The browser comes from scripts/ensure-browser (Debian's `chromium`); Playwright never downloads
one. A browser that cannot be found or started fails the tests: nothing is skipped.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Playwright, sync_playwright

from tests.browser.web import ARTIFACTS_DIR, Web
from tests.e2e.conftest import backend, ca_bundle, deployment, runner_image
from tests.e2e.harness import REPO_ROOT, Deployment

__all__ = ["backend", "ca_bundle", "deployment", "runner_image"]

# Keep the browser off the network but for the page under test (see FIELD-NOTES).
CHROMIUM_ARGS = [
    "--no-sandbox",  # tests run as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """The browser binary, provisioned by the project's own script (fast when present)."""
    if os.environ.get("CI_CHROMIUM"):
        return os.environ["CI_CHROMIUM"]
    result = subprocess.run([str(REPO_ROOT / "scripts" / "ensure-browser")], capture_output=True,
                            text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"scripts/ensure-browser failed:\n{result.stderr[-2000:]}")
    return result.stdout.strip().splitlines()[-1]


# Package scope, not session: Playwright's sync API keeps an asyncio loop running in this
# thread until it stops, and the tests after this package (asyncio.run in the server's unit
# tests) must find none when everything runs in one process.
@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="package")
def browser(playwright: Playwright, chromium_path: str) -> Iterator[Browser]:
    try:
        launched = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
    except Exception as exc:  # noqa: BLE001 - any launch failure fails the tests, loudly
        pytest.fail(f"cannot start {chromium_path}: {exc}")
    try:
        yield launched
    finally:
        launched.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots go (git-ignored); kept after the run for people and CI to look at."""
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS_DIR


@pytest.fixture
def web(deployment: Deployment, browser: Browser) -> Iterator[Web]:
    """A deployment with a server and a controller, and pages of a fresh browser context."""
    deployment.start_controller()
    deployment.start_server()
    session = Web(deployment, browser)
    try:
        yield session
    finally:
        session.close()
