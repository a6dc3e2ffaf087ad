"""GET /metrics of one replica: no key needed, database counts at scrape time, refused keys."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ci_common.errors import CIError
from tests.unit.test_server_support import Server, server

__all__ = ["server"]


def samples(server: Server) -> dict[str, float]:
    """`name{label="v"}` → value, as scraped without any key."""
    response = server.client.get("/metrics")
    assert response.status_code == 200, response.text
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def test_jobs_by_status_and_queue_depth_come_from_the_database(server: Server) -> None:
    first, second = server.submit(), server.submit()
    server.run(first)
    now = samples(server)
    assert now['ci_jobs{status="queued"}'] == 1
    assert now['ci_jobs{status="running"}'] == 1
    assert now['ci_jobs{status="completed"}'] == 0
    assert now["ci_queue_depth"] == 1
    server.finish(first)
    server.finish(second)
    later = samples(server)
    assert later['ci_jobs{status="completed"}'] == 2
    assert later["ci_queue_depth"] == 0


def test_refused_keys_are_counted(server: Server) -> None:
    assert samples(server)["ci_auth_failures_total"] == 0
    assert server.client.get("/jobs").status_code == 401
    assert server.client.get("/jobs", headers={"Authorization": "Bearer ci_nope"}).status_code \
        == 401
    assert server.client.get("/jobs", headers=server.alice.headers).status_code == 200
    assert samples(server)["ci_auth_failures_total"] == 2


def test_metrics_stay_up_while_the_database_is_away(server: Server,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def down() -> None:
        raise CIError("database unavailable")

    monkeypatch.setattr(server.repo, "count_jobs_by_status", down)
    now = samples(server)
    assert "ci_sse_watchers" in now and "ci_queue_depth" not in now


def test_metrics_are_not_in_the_api_document(server: Server) -> None:
    assert "/metrics" not in server.client.get("/openapi.json").json()["paths"]
