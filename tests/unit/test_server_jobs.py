"""Job endpoints: submit (limits, archive checks), list, get, cancel, isolation, errors, docs."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import ci_server.app as app_module
from ci_common.models import Job, JobStatus
from ci_common.settings import Settings
from ci_persistence.memory import InMemoryRepository
from ci_server.app import create_app
from ci_server.upload import MULTIPART_OVERHEAD_BYTES, parse_timeout
from tests.leases import hold_lease
from tests.unit.test_server_support import (
    Server,
    add_account,
    make_server,
    project_zip,
    read_stream,
    server,
    upload,
)

__all__ = ["server"]

REPO_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- submit
def test_submit_creates_a_queued_job_with_the_archive(server: Server) -> None:
    archive = project_zip()
    response = upload(server.client, server.alice, archive, timeout="90")
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "queued"
    job = server.repo.get_job(body["id"], user_id=server.alice.user.id)
    assert job.timeout_seconds == 90.0
    assert server.repo.get_archive(job.id) == archive


def test_submit_without_timeout_uses_the_default(server: Server) -> None:
    job_id = server.submit()
    assert server.repo.get_job(job_id).timeout_seconds is None
    assert server.repo.get_job(job_id).no_cache is False


@pytest.mark.parametrize(("raw", "expected"), [("true", True), ("1", True), ("false", False)])
def test_submit_takes_no_cache(server: Server, raw: str, expected: bool) -> None:
    response = upload(server.client, server.alice, project_zip(), no_cache=raw)
    assert response.status_code == 201
    assert server.repo.get_job(response.json()["id"]).no_cache is expected


def test_submit_refuses_a_bad_no_cache(server: Server) -> None:
    response = upload(server.client, server.alice, project_zip(), no_cache="maybe")
    assert response.status_code == 400
    assert response.json()["detail"] == "'no_cache' must be true or false, not 'maybe'"


@pytest.mark.parametrize("timeout", ["0", "-5", "soon", "nan", "inf"])
def test_submit_refuses_a_bad_timeout(server: Server, timeout: str) -> None:
    response = upload(server.client, server.alice, project_zip(), timeout=timeout)
    assert response.status_code == 400
    assert response.json()["detail"].startswith("timeout must be a positive number of seconds")
    assert server.repo.count_jobs(server.alice.user.id) == 0


@pytest.fixture
def capped() -> Iterator[Server]:
    yield from make_server(max_job_timeout_s=600.0)


@pytest.mark.parametrize("timeout", ["601", "1e300", "600.001"])
def test_submit_refuses_a_timeout_over_the_maximum(capped: Server, timeout: str) -> None:
    response = upload(capped.client, capped.alice, project_zip(), timeout=timeout)
    assert response.status_code == 400
    assert response.json() == {"detail": "timeout must be at most 600 seconds (the server's "
                                         f"CI_MAX_JOB_TIMEOUT), not {timeout!r}"}
    assert capped.repo.count_jobs(capped.alice.user.id) == 0


def test_submit_takes_a_timeout_of_exactly_the_maximum(capped: Server) -> None:
    response = upload(capped.client, capped.alice, project_zip(), timeout="600")
    assert response.status_code == 201
    assert capped.repo.get_job(response.json()["id"]).timeout_seconds == 600.0


def test_parse_timeout() -> None:
    assert parse_timeout(None, 10.0) is None
    assert parse_timeout(" ", 10.0) is None
    assert parse_timeout("1.5", 10.0) == 1.5


def test_submit_without_the_archive_field(server: Server) -> None:
    response = server.client.post("/jobs", headers=server.alice.headers, data={"timeout": "5"})
    assert response.status_code == 400
    assert response.json() == {"detail": "missing file field 'archive' (a zip of the project)"}
    response = server.client.post("/jobs", headers=server.alice.headers,
                                  files={"other": ("p.zip", project_zip(), "application/zip")})
    assert response.status_code == 400


@pytest.mark.parametrize(("archive", "detail"), [
    (b"", "invalid archive: the upload is empty"),
    (b"definitely not a zip", "invalid archive: not a zip file"),
    (project_zip()[:200], "invalid archive: not a zip file"),
    (project_zip({"../evil.py": "x"}), "invalid archive: entry '../evil.py' escapes the project"),
    (project_zip({"/abs.py": "x"}), "invalid archive: entry '/abs.py' is an absolute path"),
    (project_zip(layout=False, extra={"src/a.py": "", "tests/t.py": ""}),
     "project is missing requirements.txt"),
    (project_zip(layout=False, extra={"requirements.txt": "", "tests/t.py": ""}),
     "project is missing src/"),
    (project_zip(layout=False, extra={"requirements.txt": "", "src/a.py": ""}),
     "project is missing tests/"),
], ids=["empty", "not-zip", "truncated", "dotdot", "absolute", "no-requirements", "no-src",
        "no-tests"])  # explicit ids: zips embed the time, and xdist workers must agree
def test_submit_refuses_bad_archives(server: Server, archive: bytes, detail: str) -> None:
    response = upload(server.client, server.alice, archive)
    assert response.status_code == 400
    assert response.json()["detail"].startswith(detail)
    assert server.repo.count_jobs(server.alice.user.id) == 0


def test_submit_refuses_a_symlink_entry(server: Server) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in ("requirements.txt", "src/a.py", "tests/t.py"):
            archive.writestr(name, "")
        link = zipfile.ZipInfo("src/secrets")
        link.external_attr = 0o120777 << 16
        archive.writestr(link, "/home/user/.ssh/id_rsa")
    response = upload(server.client, server.alice, buffer.getvalue())
    assert response.status_code == 400
    assert "symbolic link" in response.json()["detail"]


@pytest.fixture
def limited() -> Iterator[Server]:
    yield from make_server(max_upload_bytes=10_000, max_unpacked_bytes=100_000,
                           max_archive_entries=20)


def test_zip_bomb_is_refused(limited: Server) -> None:
    bomb = project_zip({"src/zeros.bin": b"\0" * 5_000_000})
    assert len(bomb) < 10_000
    response = upload(limited.client, limited.alice, bomb)
    assert response.status_code == 400
    assert response.json() == {"detail": "invalid archive: unpacks to more than 97.7 KB"}


def test_too_many_entries_are_refused(limited: Server) -> None:
    many = project_zip({f"src/m{i}.py": "" for i in range(30)})
    response = upload(limited.client, limited.alice, many)
    assert response.status_code == 400
    assert response.json()["detail"] == "invalid archive: 33 entries, over the limit of 20"


def test_archive_over_the_upload_limit(limited: Server) -> None:
    big = project_zip({"src/noise.bin": bytes(range(256)) * 60})  # ~15 KB, incompressible-ish
    big += b"\0" * max(0, 12_000 - len(big))
    response = upload(limited.client, limited.alice, big)
    assert response.status_code == 413
    assert response.json()["detail"] == \
        f"archive is {len(big) / 1024:.1f} KB, over the 9.8 KB limit"


def test_declared_content_length_over_the_limit_is_refused_up_front(limited: Server) -> None:
    body = b"x" * (10_000 + MULTIPART_OVERHEAD_BYTES + 1)
    response = limited.client.post(
        "/jobs", content=body,
        headers={**limited.alice.headers, "Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413
    assert response.json()["detail"] == \
        f"archive is {len(body) / 1024:.1f} KB, over the 9.8 KB limit"


def test_body_without_content_length_is_counted(limited: Server) -> None:
    chunk = b"--b\r\nContent-Disposition: form-data; name=\"archive\"; filename=\"p.zip\"\r\n\r\n"

    def body() -> Iterator[bytes]:
        yield chunk
        for _ in range(100):
            yield b"\0" * 1000

    response = limited.client.post(
        "/jobs", content=body(),
        headers={**limited.alice.headers, "Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413
    assert response.json()["detail"] == "archive is over the 9.8 KB limit"


def test_upload_limit_applies_only_after_authentication(limited: Server) -> None:
    body = b"x" * (10_000 + MULTIPART_OVERHEAD_BYTES + 1)
    response = limited.client.post("/jobs", content=body)
    assert response.status_code == 401


# ----------------------------------------------------------------------------- list / get
def test_list_shows_only_the_callers_jobs_newest_first(server: Server) -> None:
    mine = [server.submit() for _ in range(3)]
    theirs = server.submit(server.bob)
    response = server.client.get("/jobs", headers=server.alice.headers)
    assert response.status_code == 200
    body = response.json()
    assert [job["id"] for job in body["jobs"]] == list(reversed(mine))
    assert body["total"] == 3 and body["limit"] == 50 and body["offset"] == 0
    assert theirs not in {job["id"] for job in body["jobs"]}
    bob = server.client.get("/jobs", headers=server.bob.headers).json()
    assert [job["id"] for job in bob["jobs"]] == [theirs]


def test_list_pages(server: Server) -> None:
    ids = [server.submit() for _ in range(5)]
    page = server.client.get("/jobs?limit=2&offset=1", headers=server.alice.headers).json()
    assert [job["id"] for job in page["jobs"]] == [ids[3], ids[2]]
    assert (page["total"], page["limit"], page["offset"]) == (5, 2, 1)


def test_list_filters_by_status(server: Server) -> None:
    done, waiting = server.submit(), server.submit()
    server.run(done, "hello\n")
    server.finish(done, exit_code=0)
    server.submit(server.bob)
    completed = server.client.get("/jobs?status=completed", headers=server.alice.headers).json()
    assert [job["id"] for job in completed["jobs"]] == [done]
    assert completed["total"] == 1
    queued = server.client.get("/jobs?status=queued", headers=server.alice.headers).json()
    assert [job["id"] for job in queued["jobs"]] == [waiting]
    assert queued["total"] == 1


@pytest.mark.parametrize("query", ["limit=0", "limit=501", "offset=-1", "limit=ten",
                                   "status=passed", f"offset={2**63}",
                                   "offset=" + "9" * 5000])
def test_list_validates_paging(server: Server, query: str) -> None:
    response = server.client.get(f"/jobs?{query}", headers=server.alice.headers)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail.startswith("invalid query.")
    assert "\n" not in detail


def test_the_largest_offset_lists_nothing(server: Server) -> None:
    server.submit()
    response = server.client.get(f"/jobs?offset={2**63 - 1}", headers=server.alice.headers)
    assert response.status_code == 200
    assert response.json()["jobs"] == [] and response.json()["total"] == 1


def test_get_job(server: Server) -> None:
    job_id = server.submit()
    server.run(job_id, "hello\n")
    server.finish(job_id, exit_code=1)
    body = server.client.get(f"/jobs/{job_id}", headers=server.alice.headers).json()
    assert body["id"] == job_id
    assert body["status"] == "completed"
    assert body["success"] is False and body["exit_code"] == 1
    assert body["start_time"] is not None and body["end_time"] is not None
    assert set(body) == {"id", "status", "success", "exit_code", "reason", "created_at",
                         "start_time", "end_time", "report", "pruned_at", "pytest_args",
                         "python_version"}
    assert body["pytest_args"] == [] and body["python_version"] == "3.12"  # python:3.12-slim


def test_missing_job_is_404(server: Server) -> None:
    for method, path in [("GET", "/jobs/nope"), ("POST", "/jobs/nope/cancel"),
                         ("GET", "/jobs/nope/events")]:
        response = server.client.request(method, path, headers=server.alice.headers)
        assert response.status_code == 404
        assert response.json() == {"detail": "job nope not found"}


def test_another_users_job_is_404_like_a_missing_one(server: Server) -> None:
    job_id = server.submit(server.bob)
    for method, path in [("GET", f"/jobs/{job_id}"), ("POST", f"/jobs/{job_id}/cancel"),
                         ("GET", f"/jobs/{job_id}/events"),
                         ("GET", f"/jobs/{job_id}/events?since=now")]:
        response = server.client.request(method, path, headers=server.alice.headers)
        assert response.status_code == 404, (method, path)
        assert response.json() == {"detail": f"job {job_id} not found"}
    # and alice's cancel did not touch bob's job
    assert server.repo.get_job(job_id).cancel_requested is False


# ----------------------------------------------------------------------------- cancel
def test_cancel_a_queued_job_ends_it(server: Server) -> None:
    job_id = server.submit()
    response = server.client.post(f"/jobs/{job_id}/cancel", headers=server.alice.headers)
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "cancelled" and body["reason"] == "cancelled by user"
    events = read_stream(server.client, f"/jobs/{job_id}/events?since=start",
                         server.alice.headers)
    assert [e.event for e in events] == ["status", "end"]
    assert events[-1].json["status"] == "cancelled"


def test_cancel_a_running_job_flags_it(server: Server) -> None:
    job_id = server.submit()
    server.repo.claim_next_job(hold_lease(server.repo, "controller-1"))
    server.run(job_id, "working\n")
    response = server.client.post(f"/jobs/{job_id}/cancel", headers=server.alice.headers)
    assert response.status_code == 202
    assert response.json()["status"] == "running"
    assert server.repo.get_job(job_id).cancel_requested is True


def test_cancel_a_finished_job_changes_nothing(server: Server) -> None:
    job_id = server.submit()
    server.run(job_id)
    server.finish(job_id)
    response = server.client.post(f"/jobs/{job_id}/cancel", headers=server.alice.headers)
    assert response.status_code == 202
    assert response.json()["status"] == JobStatus.COMPLETED


# ----------------------------------------------------------------------------- errors, docs
def test_unknown_route_and_method_answer_one_line_json(server: Server) -> None:
    assert server.client.get("/nope").json() == {"detail": "Not Found"}
    response = server.client.delete("/jobs", headers=server.alice.headers)
    assert response.status_code == 405
    assert response.json() == {"detail": "Method Not Allowed"}


def test_unexpected_errors_are_a_one_line_500() -> None:
    class Broken(InMemoryRepository):
        def list_jobs(self, user_id: str, limit: int = 50, offset: int = 0,
                      status: JobStatus | None = None) -> list[Job]:
            raise ZeroDivisionError("boom")

    repo = Broken()
    account = add_account(repo, "a@example.com")
    with TestClient(create_app(Settings(), repo), raise_server_exceptions=False) as client:
        response = client.get("/jobs", headers=account.headers)
    assert response.status_code == 500
    request_id = response.headers["X-Request-ID"]
    assert response.json() == {"detail": f"internal server error (request id {request_id})"}


def test_openapi_documents_every_endpoint_and_its_errors(server: Server) -> None:
    spec = server.client.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        ("/jobs", "post"): {"201", "400", "401", "413", "429"},
        ("/jobs", "get"): {"200", "401", "422", "429"},
        ("/jobs/{job_id}", "get"): {"200", "401", "404"},
        ("/jobs/{job_id}/cancel", "post"): {"202", "401", "404"},
        ("/jobs/{job_id}/events", "get"): {"200", "400", "401", "404"},
    }
    for (path, method), codes in expected.items():
        responses = paths[path][method]["responses"]
        assert codes <= set(responses), (path, method, set(responses))
        for code in codes - {"200", "201", "202"}:
            schema = responses[code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}
    body = paths["/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["archive"]
    assert "text/event-stream" in paths["/jobs/{job_id}/events"]["get"]["responses"]["200"][
        "content"]
    assert "security" in paths["/jobs"]["get"]
    assert "security" not in paths["/health"]["get"]


def test_importing_the_module_opens_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[object] = []
    import ci_persistence

    monkeypatch.setattr(ci_persistence, "open_repository", lambda s: opened.append(s))
    threads_before = threading.active_count()
    monkeypatch.delitem(sys.modules, "ci_server.app")  # restored after the test
    module = importlib.import_module("ci_server.app")
    assert opened == []
    assert threading.active_count() == threads_before
    assert module.app.state.ci.repository is None


def test_module_app_opens_the_repository_in_its_lifespan(monkeypatch: pytest.MonkeyPatch) -> None:
    repo = InMemoryRepository()
    closed: list[bool] = []
    monkeypatch.setattr(repo, "close", lambda: closed.append(True))
    monkeypatch.setattr(app_module, "open_repository", lambda settings: repo)
    app = app_module.app_from_env()
    with TestClient(app) as client:
        assert app.state.ci.repository is repo
        assert app.state.ci.relay.running
        assert client.get("/health").status_code == 200
        assert client.get("/jobs").status_code == 401
    assert closed == [True]
    assert app.state.ci.repository is None


def test_the_server_never_imports_docker() -> None:
    code = "import sys, ci_server.app; sys.exit('docker' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
