"""How a request that goes wrong ends, under real uvicorn: an unexpected error is logged once
with its request id and answered 500; a client that leaves mid-upload is one INFO line."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from ci_common.models import Job, JobStatus
from ci_common.settings import Settings
from ci_persistence.memory import InMemoryRepository
from ci_server.app import create_app
from tests.api.conftest import LiveApi
from tests.api.live_server import serve_in_thread
from tests.unit.test_server_support import BASE_SETTINGS, Account, add_account

WAIT_FOR_LOG_S = 5.0


class BrokenListing(InMemoryRepository):
    """A repository whose job listing fails in a way no handler expects."""

    def list_jobs(self, user_id: str, limit: int = 50, offset: int = 0,
                  status: JobStatus | None = None) -> list[Job]:
        raise ZeroDivisionError("boom")


@pytest.fixture
def broken() -> Iterator[tuple[str, Account]]:
    repo = BrokenListing()
    account = add_account(repo, "a@example.com")
    with serve_in_thread(create_app(Settings(), repo)) as url:
        yield url, account


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.exc_info]


def test_an_unexpected_error_is_logged_once_with_the_request_id(
        broken: tuple[str, Account], caplog: pytest.LogCaptureFixture) -> None:
    url, account = broken
    caplog.set_level(logging.INFO)
    response = httpx.get(f"{url}/jobs", headers=account.headers)
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    assert response.json() == {"detail": f"internal server error (request id {request_id})"}
    [logged] = tracebacks(caplog)
    assert request_id in logged.getMessage()
    assert "GET /jobs" in logged.getMessage()
    assert logged.exc_info is not None and logged.exc_info[0] is ZeroDivisionError
    assert not [r for r in caplog.records if r.name.startswith("uvicorn")
                and r.levelno >= logging.ERROR]


def test_a_sane_incoming_request_id_is_kept(broken: tuple[str, Account],
                                            caplog: pytest.LogCaptureFixture) -> None:
    url, account = broken
    response = httpx.get(f"{url}/jobs", headers={**account.headers,
                                                 "X-Request-ID": "lb-7f3a.2:9"})
    assert response.headers["x-request-id"] == "lb-7f3a.2:9"
    assert "lb-7f3a.2:9" in response.json()["detail"]
    assert "lb-7f3a.2:9" in tracebacks(caplog)[0].getMessage()


@pytest.fixture
def served() -> Iterator[tuple[str, Account]]:
    repo = InMemoryRepository()
    account = add_account(repo, "a@example.com")
    with serve_in_thread(create_app(BASE_SETTINGS, repo)) as url:
        yield url, account


def send_headers_then_leave(url: str, account: Account, body_sent: bytes, declared: int) -> None:
    """POST /jobs announcing `declared` body bytes, send `body_sent`, and hang up."""
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST /jobs HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {account.key}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {declared}\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head.encode() + body_sent)


def wait_for_record(caplog: pytest.LogCaptureFixture, text: str) -> logging.LogRecord:
    deadline = time.monotonic() + WAIT_FOR_LOG_S
    while time.monotonic() < deadline:
        for record in caplog.records:
            if text in record.getMessage():
                return record
        time.sleep(0.02)
    raise AssertionError(f"no log line with {text!r}: {[r.getMessage() for r in caplog.records]}")


def test_a_client_gone_mid_upload_is_one_info_line(served: tuple[str, Account],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    url, account = served
    caplog.set_level(logging.INFO)
    send_headers_then_leave(url, account, b"--b\r\n", declared=100)
    record = wait_for_record(caplog, "went away")
    assert record.levelno == logging.INFO
    assert "POST /jobs" in record.getMessage()
    time.sleep(0.2)  # anything uvicorn would add comes right after
    assert tracebacks(caplog) == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    # and the server goes on serving
    assert httpx.get(f"{url}/jobs", headers=account.headers).status_code == 200


def test_under_uvicorn_a_client_gone_mid_upload_is_one_info_line_in_the_log(api: LiveApi) -> None:
    send_headers_then_leave(api.url, api.seed.alice, b"--b\r\n", declared=100)
    deadline = time.monotonic() + WAIT_FOR_LOG_S
    logged = ""
    while "went away" not in logged and time.monotonic() < deadline:
        time.sleep(0.02)
        logged += api.server.new_log()
    [line] = [line for line in logged.splitlines() if "went away" in line]
    assert line.startswith("INFO:")
    assert "POST /jobs" in line


def test_under_uvicorn_a_malformed_multipart_body_is_a_400_and_no_log_line(api: LiveApi) -> None:
    body = b"--b\r\nContent-Disposition: form-data; name=\"archive\"\r\nBad[Header: x\r\n\r\nz"
    response = httpx.post(f"{api.url}/jobs", content=body, headers={
        **api.seed.alice.headers, "Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 400
    assert "\n" not in response.json()["detail"]
    time.sleep(0.2)  # the line, if any, is written while the request is parsed
    assert api.server.new_log() == ""
