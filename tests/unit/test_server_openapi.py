"""The published OpenAPI document: valid for the version it declares, and saying the limits."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from openapi_spec_validator import validate

from tests.unit.test_server_support import Server, make_server, server

__all__ = ["server"]


def published(server: Server) -> dict[str, Any]:
    response = server.client.get("/openapi.json")
    assert response.status_code == 200
    spec: dict[str, Any] = response.json()
    return spec


def test_the_spec_validates_as_the_version_it_declares(server: Server) -> None:
    spec = published(server)
    assert spec["openapi"].startswith("3.1.")
    validate(spec)  # raises on the first violation of the OpenAPI 3.1 schema


def test_the_event_streams_schema_describes_one_event_as_3_1_reads_it(server: Server) -> None:
    media = published(server)["paths"]["/jobs/{job_id}/events"]["get"]["responses"]["200"][
        "content"]["text/event-stream"]
    assert "itemSchema" not in media
    assert media["schema"]["type"] == "object"
    assert set(media["schema"]["properties"]) >= {"id", "event", "data"}


@pytest.fixture
def capped() -> Iterator[Server]:
    yield from make_server(max_job_timeout_s=600.0)


def test_the_submission_form_says_the_timeout_maximum_of_this_server(capped: Server) -> None:
    body = published(capped)["paths"]["/jobs"]["post"]["requestBody"]
    schema = body["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["archive"]
    assert schema["properties"]["timeout"]["maximum"] == 600.0
    assert schema["properties"]["timeout"]["exclusiveMinimum"] == 0
