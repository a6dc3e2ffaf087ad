"""Authentication and isolation against real server processes, over straight HTTP.

Users and keys are made, revoked, deactivated and reactivated with the real `ci-admin` while the
server runs; each change must hold from the very next request, on every endpoint. Keys must
never reach a log or (in plaintext) the database. Bad keys are rate-limited per client address:
a second loopback address (127.0.0.2, Linux routes all of 127/8 to `lo`) is a second client.

Decision (documented in docs/DESIGN.md): while an address is limited, a GOOD key from it is
refused too (429). Letting valid keys through would keep answering every guess, 200 for the
right one and 429 for the rest, so the limit would stop no one; the price is that a client
sharing an address with a guesser waits for at most a minute.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import sqlite3
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.e2e.harness import (
    KEY_PATTERN,
    PASSING_TEST,
    Deployment,
    Process,
    User,
    free_port,
    on_both_backends,
    wait_for_health,
    write_project,
    zip_project,
)

pytestmark = pytest.mark.docker

HTTP_TIMEOUT_S = 20.0
MISSING_JOB = "00000000-0000-4000-8000-000000000000"


# ------------------------------------------------------------------------- helpers
@dataclass
class Answer:
    status: int
    headers: httpx.Headers
    body: bytes

    def detail(self) -> str:
        return str(json.loads(self.body)["detail"])


def call(base: str, method: str, path: str, headers: dict[str, str],
         client: httpx.Client | None = None, archive: bytes | None = None) -> Answer:
    """One request; an event stream that opens is closed at once (a job may never end)."""
    own = client is None
    client = client or httpx.Client(timeout=HTTP_TIMEOUT_S)
    try:
        files = {"archive": ("project.zip", archive)} if archive is not None else None
        with client.stream(method, base + path, headers=headers, files=files) as response:
            streaming = response.headers.get("content-type", "").startswith("text/event-stream")
            body = b"" if streaming else response.read()
            return Answer(response.status_code, response.headers, body)
    finally:
        if own:
            client.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def endpoints(job_id: str) -> list[tuple[str, str]]:
    return [("GET", "/jobs"), ("POST", "/jobs"), ("GET", f"/jobs/{job_id}"),
            ("POST", f"/jobs/{job_id}/cancel"), ("GET", f"/jobs/{job_id}/events")]


def unknown_key() -> str:
    """A key of the right shape that no one was ever given."""
    return "ci_" + secrets.token_urlsafe(32)


def add_key(dep: Deployment, email: str) -> tuple[str, str]:
    """A further key for the user: (key, key id)."""
    out = dep.admin("key", "create", "--email", email, "--name", f"k{uuid.uuid4().hex[:6]}").stdout
    match = KEY_PATTERN.search(out)
    assert match, out
    keys = json.loads(dep.admin("key", "list", "--email", email, "--json").stdout)
    prefix = match.group(0)[:11]
    (key_id,) = [k["id"] for k in keys if k["prefix"] == prefix]
    return match.group(0), key_id


def key_id_of(dep: Deployment, user: User) -> str:
    keys = json.loads(dep.admin("key", "list", "--email", user.email, "--json").stdout)
    (key_id,) = [k["id"] for k in keys if k["prefix"] == user.api_key[:11]]
    return str(key_id)


def user_id_of(dep: Deployment, user: User) -> str:
    found = json.loads(dep.admin("user", "get", "--email", user.email, "--json").stdout)
    return str(found[0]["id"])


class Site:
    """A running server with a project archive and a queued job of `owner`'s to aim at."""

    def __init__(self, dep: Deployment, server: Process, owner: User, archive: bytes) -> None:
        self.dep, self.server, self.owner, self.archive = dep, server, owner, archive
        self.base = str(server.url)
        created = call(self.base, "POST", "/jobs", bearer(owner.api_key), archive=archive)
        assert created.status == 201, created.body
        self.job_id = str(json.loads(created.body)["id"])

    def call(self, method: str, path: str, headers: dict[str, str],
             client: httpx.Client | None = None) -> Answer:
        archive = self.archive if (method, path) == ("POST", "/jobs") else None
        return call(self.base, method, path, headers, client, archive)

    def job_count(self) -> int:
        """Every job in the database, whoever owns it (the owner's key may be refused now)."""
        if self.dep.database_url:
            with psycopg.connect(self.dep.database_url) as pg:
                row = pg.execute("SELECT COUNT(*) FROM jobs").fetchone()
                assert row is not None
                return int(row[0])
        with contextlib.closing(sqlite3.connect(self.dep.db_path)) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])

    def cancel_requested(self) -> bool:
        repository = self.dep.open_repository()
        try:
            return repository.get_job(self.job_id).cancel_requested
        finally:
            repository.close()

    def assert_refused_everywhere(self, headers: dict[str, str], phrase: str) -> None:
        """401 with a one-line detail naming the problem on every endpoint; no side effect."""
        jobs_before = self.job_count()
        for method, path in endpoints(self.job_id):
            answer = self.call(method, path, headers)
            where = f"{method} {path} with {headers or 'no header'}"
            assert answer.status == 401, (where, answer.status, answer.body)
            assert answer.headers["www-authenticate"] == "Bearer", where
            assert answer.headers["content-type"] == "application/json", where
            detail = answer.detail()
            assert phrase in detail and "\n" not in detail, (where, detail)
        assert self.job_count() == jobs_before
        assert not self.cancel_requested()

    def assert_accepted_everywhere(self, key: str) -> None:
        for method, path in endpoints(self.job_id):
            answer = self.call(method, path, bearer(key))
            want = 201 if (method, path) == ("POST", "/jobs") else (
                202 if path.endswith("/cancel") else 200)
            assert answer.status == want, (method, path, answer.status, answer.body)


@pytest.fixture
def site(deployment: Deployment, tmp_path: Path) -> Iterator[Site]:
    """A server (no controller: jobs stay queued) whose limiter the tests here never trip."""
    server = deployment.start_server(CI_AUTH_FAILURES_PER_MINUTE="100000")
    project = write_project(tmp_path / "project", {"test_ok.py": PASSING_TEST})
    yield Site(deployment, server, deployment.create_user(), zip_project(project))


# ------------------------------------------------------------------------- refusals
BAD_HEADERS: dict[str, tuple[dict[str, str], str]] = {
    "no header": ({}, "missing API key"),
    "Bearer alone": ({"Authorization": "Bearer"}, "malformed API key"),
    "Basic": ({"Authorization": "Basic x"}, "malformed API key"),
    "not a key": ({"Authorization": "Bearer not-a-key"}, "malformed API key"),
    "empty": ({"Authorization": ""}, "missing API key"),
    "unknown key": (bearer(unknown_key()), "invalid API key"),
}


def test_every_endpoint_refuses_missing_malformed_and_unknown_keys(site: Site) -> None:
    for headers, phrase in BAD_HEADERS.values():
        site.assert_refused_everywhere(headers, phrase)
    # The same key with its last character changed is just as unknown.
    key = site.owner.api_key
    near_miss = key[:-1] + ("A" if key[-1] != "A" else "B")
    site.assert_refused_everywhere(bearer(near_miss), "invalid API key")


@on_both_backends
def test_revoked_key_is_refused_from_the_very_next_request(site: Site) -> None:
    dep, owner = site.dep, site.owner
    spare_key, _ = add_key(dep, owner.email)
    key_id = key_id_of(dep, owner)
    with httpx.Client(timeout=HTTP_TIMEOUT_S) as client:  # one kept-alive connection throughout
        assert site.call("GET", f"/jobs/{site.job_id}", bearer(owner.api_key), client).status == 200
        dep.admin("key", "revoke", key_id)
        answer = site.call("GET", f"/jobs/{site.job_id}", bearer(owner.api_key), client)
    assert (answer.status, answer.detail()) == (401, "API key has been revoked")
    site.assert_refused_everywhere(bearer(owner.api_key), "API key has been revoked")
    # The user's other key is untouched.
    assert site.call("GET", f"/jobs/{site.job_id}", bearer(spare_key)).status == 200


def test_deactivated_user_is_refused_at_once_and_reactivation_restores(site: Site) -> None:
    dep, owner = site.dep, site.owner
    second_key, _ = add_key(dep, owner.email)
    user_id = user_id_of(dep, owner)
    assert site.call("GET", "/jobs", bearer(owner.api_key)).status == 200
    dep.admin("user", "deactivate", user_id)
    answer = site.call("GET", "/jobs", bearer(owner.api_key))
    assert (answer.status, answer.detail()) == (401, "user account is deactivated")
    for key in (owner.api_key, second_key):  # every key of the user, at once
        site.assert_refused_everywhere(bearer(key), "user account is deactivated")
    dep.admin("user", "activate", user_id)
    assert site.call("GET", "/jobs", bearer(owner.api_key)).status == 200
    site.assert_accepted_everywhere(second_key)
    assert site.cancel_requested()  # the accepted cancel did act


# ------------------------------------------------------------------------- isolation
def comparable(answer: Answer, job_id: str) -> tuple[int, str, bytes]:
    body = answer.body.replace(job_id.encode(), b"<id>")
    return answer.status, answer.headers.get("content-type", ""), body


@on_both_backends
def test_another_users_job_is_a_404_identical_to_a_missing_one(site: Site) -> None:
    bob = site.dep.create_user()
    job_id = site.job_id
    cases = [("GET", "/jobs/{id}", {}), ("POST", "/jobs/{id}/cancel", {}),
             ("GET", "/jobs/{id}/events", {}), ("GET", "/jobs/{id}/events?since=now", {}),
             ("GET", "/jobs/{id}/events", {"Last-Event-ID": "1"}),
             ("GET", "/jobs/{id}/events", {"Last-Event-ID": "garbage"})]
    for method, template, extra in cases:
        headers = {**bearer(bob.api_key), **extra}
        theirs = site.call(method, template.format(id=job_id), headers)
        missing = site.call(method, template.format(id=MISSING_JOB), headers)
        assert theirs.status == 404, (method, template, extra, theirs.body)
        assert comparable(theirs, job_id) == comparable(missing, MISSING_JOB), (method, template)
        assert set(theirs.headers) == set(missing.headers)
    # The owner gets the same 404 for a missing job as bob gets for hers.
    own_missing = site.call("GET", f"/jobs/{MISSING_JOB}", bearer(site.owner.api_key))
    theirs = site.call("GET", f"/jobs/{job_id}", bearer(bob.api_key))
    assert comparable(own_missing, MISSING_JOB) == comparable(theirs, job_id)
    listing = json.loads(site.call("GET", "/jobs", bearer(bob.api_key)).body)
    assert (listing["jobs"], listing["total"]) == ([], 0)
    assert not site.cancel_requested()  # bob's cancel did nothing
    assert site.call("GET", f"/jobs/{job_id}", bearer(site.owner.api_key)).status == 200


# ------------------------------------------------------------------------- rate limiting
def test_bad_keys_are_rate_limited_per_client_address(deployment: Deployment) -> None:
    server = deployment.start_server(CI_AUTH_FAILURES_PER_MINUTE="5")
    good = deployment.create_user().api_key
    base = str(server.url)
    bad_requests = [bearer(unknown_key()), {"Authorization": "Bearer not-a-key"},
                    {"Authorization": "Basic x"}, bearer(unknown_key()), bearer(unknown_key())]
    for headers in bad_requests:
        assert call(base, "GET", "/jobs", headers).status == 401
    limited = call(base, "GET", "/jobs", bearer(unknown_key()))
    assert limited.status == 429, limited.body
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    detail = limited.detail()
    assert detail.startswith("too many failed authentication attempts; try again in ")
    assert "\n" not in detail
    # Decision: a good key from a limited address is refused too (see the module docstring).
    assert call(base, "GET", "/jobs", bearer(good)).status == 429
    assert call(base, "GET", "/jobs", {}).status == 401  # no key is no guess: not counted
    assert call(base, "GET", "/health", {}).status == 200
    cli = deployment.ci("list", server=server, api_key=good, timeout=60)
    assert cli.returncode == 1
    assert cli.stderr.startswith("Error: too many failed authentication attempts; try again in ")
    assert cli.stderr.count("\n") == 1 and "Traceback" not in cli.stderr

    other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"),
                         timeout=HTTP_TIMEOUT_S)
    with other:
        assert call(base, "GET", "/jobs", bearer(good), other).status == 200
        # Its own count: four more bad keys are still answered 401...
        for i in range(5):
            # ...even when it claims to be someone else: it is not a trusted proxy.
            spoofed = {**bearer(unknown_key()), "X-Forwarded-For": f"10.0.0.{i}"}
            assert call(base, "GET", "/jobs", spoofed, other).status == 401
        assert call(base, "GET", "/jobs", bearer(unknown_key()), other).status == 429
        assert call(base, "GET", "/jobs", bearer(good), other).status == 429


# ------------------------------------------------------------------------- the CLI
def test_cli_with_a_wrong_revoked_or_deactivated_key_says_so_in_one_line(
    site: Site, tmp_path: Path
) -> None:
    dep, server = site.dep, site.server
    project = write_project(tmp_path / "cli-project", {"test_ok.py": PASSING_TEST})
    revoked, revoked_id = add_key(dep, site.owner.email)
    dep.admin("key", "revoke", revoked_id)
    carol = dep.create_user()
    dep.admin("user", "deactivate", user_id_of(dep, carol))
    cases = {
        "unknown": (unknown_key(), "Error: invalid API key"),
        "malformed": ("not-a-key", "Error: malformed API key (expected ci_…)"),
        "revoked": (revoked, "Error: API key has been revoked"),
        "deactivated": (carol.api_key, "Error: user account is deactivated"),
    }
    for name, (key, message) in cases.items():
        # Every command shares one error path; each is tried once, `list` with every key.
        commands = {"unknown": [("list",), ("wait", site.job_id)],
                    "revoked": [("list",), ("submit", "test")]}.get(name, [("list",)])
        for args in commands:
            result = dep.ci(*args, cwd=project, server=server, api_key=key, timeout=60)
            where = (name, args, result.stdout, result.stderr)
            assert result.returncode == 1, where
            # `submit` shows its progress ("Packing project…", "Uploading…") before the error.
            assert result.stderr.splitlines()[-1] == message, where
            assert result.stderr.count("Error") == 1, where
            assert "Traceback" not in result.stderr + result.stdout, where
    assert site.job_count() == 1  # no submission got through


# ------------------------------------------------------------------------- keys in logs
def test_no_key_or_key_hash_reaches_a_log_or_the_database(deployment: Deployment,
                                                          tmp_path: Path) -> None:
    dep = deployment
    port = free_port()
    server = dep._spawn("server", [sys.executable, "-m", "uvicorn", "ci_server.app:app",
                                   "--host", "127.0.0.1", "--port", str(port),
                                   "--log-level", "debug"],
                        dep.env(CI_AUTH_FAILURES_PER_MINUTE="100000"))
    server.url = f"http://127.0.0.1:{port}"
    wait_for_health(server)
    controller = dep._spawn("controller", [sys.executable, "-m", "ci_controller", "--debug"],
                            dep.env())
    alice, bob = dep.create_user(), dep.create_user()
    revoked, revoked_id = add_key(dep, alice.email)
    dep.admin("key", "revoke", revoked_id)
    dep.admin("user", "deactivate", user_id_of(dep, bob))
    unknown, base = unknown_key(), str(server.url)
    keys = [alice.api_key, bob.api_key, revoked, unknown]

    project = write_project(tmp_path / "project", {"test_ok.py": PASSING_TEST})
    full_job = dep.ci("submit", "test", cwd=project, server=server, api_key=alice.api_key)
    assert full_job.returncode == 0, full_job.stderr
    job_id = str(json.loads(call(base, "GET", "/jobs", bearer(alice.api_key)).body)
                 ["jobs"][0]["id"])
    statuses = []
    for key in keys:
        for method, path in endpoints(job_id):
            # Alice's key on POST /jobs with a broken archive: a 400 rather than a second job.
            archive = b"not a zip" if key == alice.api_key else zip_project(project)
            statuses.append(call(base, method, path, bearer(key),
                                 archive=archive if path == "/jobs" and method == "POST" else None
                                 ).status)
    # alice: list, bad archive, get, cancel (202 even once finished), events; then 401s.
    assert statuses == [200, 400, 200, 202, 200] + [401] * 15, statuses
    assert controller.popen.poll() is None and server.popen.poll() is None

    logs = {process.log_path.name: process.log() for process in dep.processes}
    assert "GET /jobs" in logs[server.log_path.name]  # the access log is on: requests were logged
    outputs = full_job.stdout + full_job.stderr
    db_files = [p for p in dep.workdir.iterdir() if p.name.startswith(dep.db_path.name)]
    database = b"".join(p.read_bytes() for p in db_files)
    for key in keys:
        digest = hashlib.sha256(key.encode()).hexdigest()
        for name, text in logs.items():
            assert key not in text, f"a key in {name}"
            assert digest not in text, f"a key hash in {name}"
        assert key not in outputs and digest not in outputs
        assert key.encode() not in database, "a plaintext key in the database"
        if key != unknown:  # control: the digest computed here is the one the database keeps
            assert digest.encode() in database
