"""Property-based fuzzing of POST /jobs with generated archives (tests/api/archives.py).

Valid projects, truncated and damaged zips, hostile entries (escaping names, links, devices,
duplicates), oversized ones (upload, unpacked size, entry count), bad timeouts, and bodies cut
off mid-upload. Each must get a 201 with a job the caller can read, or the one 4xx its kind is
owed with a one-line detail, and no traceback in the server log (the `api` fixture).
Examples and seed: tests/api/fuzzing.py.
"""

from __future__ import annotations

import socket
import time
import uuid
import zipfile
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.api.archives import KINDS, Entry, Upload, build_zip, projects
from tests.api.conftest import LiveApi
from tests.api.fuzzing import PLAN

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(PLAN.timeout_s)]

UPLOAD_EXAMPLES = 2 * PLAN.examples  # per kind; an upload costs a few ms
WAIT_FOR_LOG_S = 5.0


@pytest.fixture
def client(api: LiveApi) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, headers=api.seed.alice.headers, timeout=30) as client:
        yield client


def submit(client: httpx.Client, upload: Upload) -> httpx.Response:
    data = None if upload.timeout is None else {"timeout": upload.timeout}
    return client.post("/jobs", data=data,
                       files={"archive": ("project.zip", upload.archive, "application/zip")})


def check_answer(client: httpx.Client, upload: Upload, response: httpx.Response) -> None:
    assert response.status_code in upload.status, (upload.kind, response.text)
    body = response.json()
    if response.status_code == 201:
        job = client.get(f"/jobs/{body['id']}")
        assert job.status_code == 200 and job.json()["status"] == "queued", job.text
        return
    assert set(body) == {"detail"} and "\n" not in body["detail"], body
    assert body["detail"].startswith(upload.detail_starts), (upload.kind, body)


@pytest.mark.parametrize("kind", list(KINDS))
def test_fuzz_uploads(client: httpx.Client, kind: str) -> None:
    @given(upload=KINDS[kind]())
    def post(upload: Upload) -> None:
        check_answer(client, upload, submit(client, upload))

    try:
        PLAN.apply(post, examples=UPLOAD_EXAMPLES)()
    except BaseException as exc:
        PLAN.note(exc)
        raise


def multipart(archive: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"archive\"; "
            f"filename=\"p.zip\"\r\nContent-Type: application/zip\r\n\r\n").encode()
    body += archive + f"\r\n--{boundary}--\r\n".encode()
    return body, boundary


def post_part_and_leave(api: LiveApi, body: bytes, boundary: str, sent: int) -> None:
    host, port = api.url.removeprefix("http://").split(":")
    head = (f"POST /jobs HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {api.seed.alice.key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head + body[:sent])


def test_fuzz_clients_leaving_mid_upload(api: LiveApi) -> None:
    left = 0

    @given(project=projects(), data=st.data())
    def leave(project: list[Entry], data: st.DataObject) -> None:
        nonlocal left
        body, boundary = multipart(build_zip(project, zipfile.ZIP_DEFLATED))
        post_part_and_leave(api, body, boundary, data.draw(st.integers(0, len(body) - 1)))
        left += 1

    try:
        PLAN.apply(leave)()
    except BaseException as exc:
        PLAN.note(exc)
        raise
    logged, deadline = "", time.monotonic() + WAIT_FOR_LOG_S
    while logged.count("went away") < left and time.monotonic() < deadline:
        time.sleep(0.05)
        logged += api.server.new_log()
    gone = [line for line in logged.splitlines() if "went away" in line]
    assert len(gone) == left and all(line.startswith("INFO:") for line in gone), logged
    assert "Traceback" not in logged and "ERROR" not in logged, logged
