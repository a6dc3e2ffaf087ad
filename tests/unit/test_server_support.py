"""Shared helpers for the ci_server tests: a running app over InMemoryRepository, users with keys,
project zips, and a small SSE reader. No tests here."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ci_common.keys import generate_key
from ci_common.models import JobOutcome, JobStatus, OutputChunk, OutputStream, User, utcnow
from ci_common.repository import Repository
from ci_common.settings import Settings
from ci_persistence.memory import InMemoryRepository
from ci_server.app import create_app
from tests.leases import owner_fence

BASE_SETTINGS = Settings(sse_keepalive_s=5.0,
                         auth_failures_per_minute=1000)


@dataclass
class Account:
    user: User
    key: str
    key_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def add_account(repo: Repository, email: str) -> Account:
    user = repo.create_user(email.split("@")[0], email)
    new = generate_key()
    api_key = repo.create_api_key(user.id, "dev", new.key_hash, new.prefix)
    return Account(user=user, key=new.plaintext, key_id=api_key.id)


def project_zip(extra: dict[str, bytes | str] | None = None, *, layout: bool = True) -> bytes:
    """A small valid project (src/, tests/, requirements.txt) plus `extra` entries."""
    files: dict[str, bytes | str] = {}
    if layout:
        files.update({"requirements.txt": "pytest\n", "src/app.py": "def one():\n    return 1\n",
                      "tests/test_app.py": "def test_one():\n    assert True\n"})
    files.update(extra or {})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def upload(client: TestClient, account: Account, archive: bytes, **data: str) -> Any:
    return client.post("/jobs", headers=account.headers, data=data or None,
                       files={"archive": ("project.zip", archive, "application/zip")})


@dataclass
class Server:
    repo: InMemoryRepository
    client: TestClient
    alice: Account
    bob: Account
    settings: Settings

    def submit(self, account: Account | None = None) -> str:
        response = upload(self.client, account or self.alice, project_zip())
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def run(self, job_id: str, *texts: str) -> None:
        """Mark the job running and append each text as one stdout chunk."""
        self.repo.mark_running(job_id, "container-1", utcnow(),
                               fence=owner_fence(self.repo, job_id))
        self.output(job_id, *texts)

    def output(self, job_id: str, *texts: str) -> None:
        for text in texts:
            cursor = self.repo.get_job(job_id).log_cursor + 1
            self.repo.append_output(job_id, [OutputChunk(OutputStream.STDOUT, text)], cursor,
                                    fence=owner_fence(self.repo, job_id))

    def finish(self, job_id: str, exit_code: int = 0) -> None:
        outcome = JobOutcome(status=JobStatus.COMPLETED, exit_code=exit_code,
                             success=exit_code == 0, reason=None)
        self.repo.finish_job(job_id, outcome, utcnow(), fence=owner_fence(self.repo, job_id))


def make_server(**overrides: Any) -> Iterator[Server]:
    settings = replace(BASE_SETTINGS, **overrides)
    repo = InMemoryRepository()
    alice = add_account(repo, "alice@example.com")
    bob = add_account(repo, "bob@example.com")
    with TestClient(create_app(settings, repo)) as client:
        yield Server(repo=repo, client=client, alice=alice, bob=bob, settings=settings)


@pytest.fixture
def server() -> Iterator[Server]:
    yield from make_server()


# ----------------------------------------------------------------------------- SSE
@dataclass
class SseEvent:
    id: str | None = None
    event: str | None = None
    data: str = ""
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> Any:
        return json.loads(self.data)

    @property
    def seq(self) -> int:
        assert self.id is not None
        return int(self.id)


def parse_sse(lines: Iterator[str]) -> Iterator[SseEvent]:
    """Events (and comment-only blocks) from text/event-stream lines, per the SSE spec."""
    current = SseEvent()
    touched = False
    for line in lines:
        if line == "":
            if touched:
                yield current
            current, touched = SseEvent(), False
            continue
        touched = True
        if line.startswith(":"):
            current.comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            current.data = value if not current.data else current.data + "\n" + value
        elif name == "id":
            current.id = value
        elif name == "event":
            current.event = value
    if touched:
        yield current


def read_stream(client: TestClient, url: str, headers: dict[str, str]) -> list[SseEvent]:
    """Every event of a stream that ends by itself (after `end`); comments dropped."""
    with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, response.read()
        return [e for e in parse_sse(response.iter_lines()) if e.event is not None]
