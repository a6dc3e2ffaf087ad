"""Authentication on every protected endpoint, the per-address failure limit, and key touching."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient

from ci_common.keys import generate_key
from ci_common.models import utcnow
from ci_server.ratelimit import WINDOW_S, FailureLimiter
from tests.unit.test_server_support import Server, make_server, project_zip, server

__all__ = ["server"]

ENDPOINTS = [
    ("POST", "/jobs"),
    ("GET", "/jobs"),
    ("GET", "/jobs/{job}"),
    ("POST", "/jobs/{job}/cancel"),
    ("GET", "/jobs/{job}/events"),
]


def call(client: TestClient, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    files = {"archive": ("p.zip", project_zip(), "application/zip")}
    response: httpx.Response = client.request(
        method, path, headers=headers, files=files if (method, path) == ("POST", "/jobs") else None)
    return response


def refused_with(server: Server, headers: dict[str, str], detail_start: str) -> None:
    job = server.submit()
    server.finish(job)  # a finished job, so an accidental 200 on /events would still end
    for method, template in ENDPOINTS:
        response = call(server.client, method, template.format(job=job), headers)
        assert response.status_code == 401, (method, template, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        detail = response.json()["detail"]
        assert detail.startswith(detail_start), (method, template, detail)
        assert "\n" not in detail


def test_health_needs_no_key(server: Server) -> None:
    response = server.client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_missing_key(server: Server) -> None:
    refused_with(server, {}, "missing API key")


@pytest.mark.parametrize("header", ["Bearer not-a-key", "Bearer ci_short", "Basic dXNlcjpwdw==",
                                    "Bearer", "ci_" + "a" * 43])
def test_malformed_key(server: Server, header: str) -> None:
    refused_with(server, {"Authorization": header}, "malformed API key")


def test_unknown_key(server: Server) -> None:
    refused_with(server, {"Authorization": f"Bearer {generate_key().plaintext}"},
                 "invalid API key")


def test_unknown_key_with_a_known_prefix(server: Server) -> None:
    forged = server.alice.key[:-4] + ("AAAA" if not server.alice.key.endswith("AAAA") else "BBBB")
    refused_with(server, {"Authorization": f"Bearer {forged}"}, "invalid API key")


def test_revoked_key(server: Server) -> None:
    server.repo.revoke_api_key(server.alice.key_id)
    # submit() needs a working key: use bob's job for the ids, alice's key for the calls
    job = server.submit(server.bob)
    server.finish(job)
    for method, template in ENDPOINTS:
        response = call(server.client, method, template.format(job=job), server.alice.headers)
        assert response.status_code == 401
        assert response.json() == {"detail": "API key has been revoked"}
        assert response.headers["www-authenticate"] == "Bearer"


def test_deactivated_user(server: Server) -> None:
    server.repo.set_user_active(server.alice.user.id, False)
    job = server.submit(server.bob)
    server.finish(job)
    for method, template in ENDPOINTS:
        response = call(server.client, method, template.format(job=job), server.alice.headers)
        assert response.status_code == 401
        assert response.json() == {"detail": "user account is deactivated"}


def test_reactivated_user_gets_in_again(server: Server) -> None:
    server.repo.set_user_active(server.alice.user.id, False)
    assert server.client.get("/jobs", headers=server.alice.headers).status_code == 401
    server.repo.set_user_active(server.alice.user.id, True)
    assert server.client.get("/jobs", headers=server.alice.headers).status_code == 200


def test_successful_use_is_recorded_once_a_minute(server: Server) -> None:
    def last_used() -> object:
        [key] = [k for k in server.repo.list_api_keys(server.alice.user.id)]
        return key.last_used_at

    assert last_used() is None
    assert server.client.get("/jobs", headers=server.alice.headers).status_code == 200
    first = last_used()
    assert first is not None
    assert server.client.get("/jobs", headers=server.alice.headers).status_code == 200
    assert last_used() == first  # within LAST_USED_RESOLUTION: no write
    server.repo.touch_api_key(server.alice.key_id, utcnow() - timedelta(minutes=5))
    assert server.client.get("/jobs", headers=server.alice.headers).status_code == 200
    assert last_used() > utcnow() - timedelta(minutes=1)  # type: ignore[operator]


# ----------------------------------------------------------------------------- rate limiting
@pytest.fixture
def strict() -> Iterator[Server]:
    yield from make_server(auth_failures_per_minute=3)


def test_repeated_bad_keys_are_rate_limited(strict: Server) -> None:
    bad = {"Authorization": f"Bearer {generate_key().plaintext}"}
    for _ in range(3):
        assert strict.client.get("/jobs", headers=bad).status_code == 401
    response = strict.client.get("/jobs", headers=bad)
    assert response.status_code == 429
    assert 1 <= int(response.headers["retry-after"]) <= WINDOW_S
    assert response.json()["detail"].startswith("too many failed authentication attempts")
    # The address is blocked, whatever key it sends now, on every endpoint.
    assert strict.client.get("/jobs", headers=strict.alice.headers).status_code == 429
    assert strict.client.post("/jobs/x/cancel", headers=strict.alice.headers).status_code == 429


def test_malformed_and_revoked_keys_count_too(strict: Server) -> None:
    strict.repo.revoke_api_key(strict.bob.key_id)
    for headers in ({"Authorization": "Bearer nope"}, {"Authorization": "Basic x"},
                    strict.bob.headers):
        assert strict.client.get("/jobs", headers=headers).status_code == 401
    assert strict.client.get("/jobs", headers=strict.alice.headers).status_code == 429


def test_requests_without_a_key_do_not_count(strict: Server) -> None:
    for _ in range(10):
        assert strict.client.get("/jobs").status_code == 401
    assert strict.client.get("/jobs", headers=strict.alice.headers).status_code == 200


def test_other_addresses_are_not_blocked(strict: Server) -> None:
    bad = {"Authorization": f"Bearer {generate_key().plaintext}"}
    for _ in range(4):
        strict.client.get("/jobs", headers=bad)
    assert strict.client.get("/jobs", headers=strict.alice.headers).status_code == 429
    app = strict.client.app
    # No `with`: the app's lifespan is already running under the first client.
    other = TestClient(app, client=("203.0.113.9", 4000))
    assert other.get("/jobs", headers=strict.alice.headers).status_code == 200


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_sliding_window() -> None:
    clock = FakeClock()
    limiter = FailureLimiter(3, clock=clock)
    for _ in range(2):
        limiter.record_failure("a")
        clock.now += 10
    assert limiter.retry_after("a") is None
    limiter.record_failure("a")  # failures at 1000, 1010, 1020
    assert limiter.retry_after("a") == 40  # the one at 1000 expires at 1060; now is 1020
    assert limiter.retry_after("b") is None
    clock.now = 1060.5
    assert limiter.retry_after("a") is None  # only two left in the window
    limiter.record_failure("a")
    assert limiter.retry_after("a") == 10  # oldest left is 1010 → 1070


def test_limiter_forgets_quiet_addresses_and_stays_bounded() -> None:
    clock = FakeClock()
    limiter = FailureLimiter(2, clock=clock, max_tracked=5)
    for i in range(5):
        limiter.record_failure(f"old{i}")
    clock.now += WINDOW_S + 1
    assert limiter.retry_after("old0") is None
    for i in range(20):
        limiter.record_failure(f"new{i}")
        assert limiter.tracked_addresses() <= 5


def test_limiter_disabled_with_zero() -> None:
    limiter = FailureLimiter(0)
    for _ in range(100):
        limiter.record_failure("a")
    assert limiter.retry_after("a") is None
    assert limiter.tracked_addresses() == 0

