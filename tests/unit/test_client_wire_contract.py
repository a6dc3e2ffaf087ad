"""The client's decoders (ci_client.wire) read exactly what the server's models (ci_common.wire)
write: one wire format, two readings, held together here.

For each answer the client reads: the same fields in the same order; for generated values,
the client decodes the server's JSON to the same values, and prints a job (`--json`) as the
same JSON as pydantic would; what pydantic refuses, the client refuses too (the client is
stricter in one way: pydantic's lax mode also takes "0" for 0, which the server never sends).
"""

from __future__ import annotations

import json
from dataclasses import fields
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

import ci_client.wire as client
import ci_common.wire as server
from ci_common.models import JobStatus, OutputStream

PAIRS: list[tuple[type[BaseModel], Any]] = [
    (server.SlowTestData, client.SlowTestData), (server.ReportData, client.ReportData),
    (server.JobView, client.JobView), (server.JobList, client.JobList),
    (server.JobCreated, client.JobCreated), (server.StatusData, client.StatusData),
    (server.OutputData, client.OutputData), (server.EndData, client.EndData),
    (server.QueueData, client.QueueData),
]


@pytest.mark.parametrize(("model", "decoded"), PAIRS, ids=lambda v: getattr(v, "__name__", ""))
def test_the_same_fields_in_the_same_order(model: type[BaseModel], decoded: Any) -> None:
    assert [f.name for f in fields(decoded)] == list(model.model_fields)


def test_the_same_event_names() -> None:
    assert (client.SSE_EVENT_STATUS, client.SSE_EVENT_OUTPUT, client.SSE_EVENT_END,
            client.SSE_EVENT_QUEUE) == (server.SSE_EVENT_STATUS, server.SSE_EVENT_OUTPUT,
                                        server.SSE_EVENT_END, server.SSE_EVENT_QUEUE)


# ------------------------------------------------------------------ generated values
text = st.text(max_size=20)
counts = st.integers(min_value=0, max_value=10**6)
seconds = st.floats(min_value=0, max_value=1e6, allow_nan=False)
zones = st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5))])
times = st.builds(lambda t, tz: t.replace(tzinfo=tz),
                  st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
                  zones)
reports = st.builds(server.ReportData, passed=counts, failed=counts, errors=counts,
                    skipped=counts, duration_s=seconds | st.integers(0, 100),
                    failing=st.lists(text, max_size=3),
                    slowest=st.lists(st.builds(server.SlowTestData, test=text,
                                               duration_s=seconds), max_size=3))
jobs = st.builds(server.JobView, id=text, status=st.sampled_from(JobStatus),
                 success=st.none() | st.booleans(), exit_code=st.none() | st.integers(-255, 255),
                 reason=st.none() | text, created_at=times, start_time=st.none() | times,
                 end_time=st.none() | times, report=st.none() | reports,
                 pruned_at=st.none() | times, pytest_args=st.lists(text, max_size=3),
                 python_version=st.none() | text)
ends = st.builds(server.EndData, status=st.sampled_from(JobStatus),
                 exit_code=st.none() | st.integers(-255, 255), success=st.booleans(),
                 reason=st.none() | text, report=st.none() | reports)


def same_values(decoded: Any, model: BaseModel) -> None:
    """Field by field, nested models included (lists of the server are tuples here)."""
    for name in type(model).model_fields:
        ours, theirs = getattr(decoded, name), getattr(model, name)
        if isinstance(theirs, BaseModel):
            same_values(ours, theirs)
        elif isinstance(theirs, list):
            assert len(ours) == len(theirs), name
            for a, b in zip(ours, theirs, strict=True):
                if isinstance(b, BaseModel):
                    same_values(a, b)
                else:
                    assert a == b, name
        else:
            assert ours == theirs and type(ours) is type(theirs), name


@settings(max_examples=150, deadline=None)
@given(jobs)
def test_a_job_decodes_to_the_same_values_and_prints_the_same(job: server.JobView) -> None:
    wire_json = json.loads(job.model_dump_json())  # what the server sends
    decoded = client.JobView.from_json(wire_json)
    same_values(decoded, job)
    assert client.to_json(decoded) == job.model_dump(mode="json")
    # The same JSON; as text it differs only in how an exponent is spelled (1e-07 vs 1e-7).
    assert json.loads(client.dumps(decoded)) == json.loads(job.model_dump_json(indent=2))


@settings(max_examples=50, deadline=None)
@given(st.lists(jobs, max_size=4), counts, st.integers(1, 500), counts)
def test_a_job_list_decodes_to_the_same_values(views: list[server.JobView], total: int,
                                               limit: int, offset: int) -> None:
    page = server.JobList(jobs=views, total=total, limit=limit, offset=offset)
    same_values(client.JobList.from_json(json.loads(page.model_dump_json())), page)


@settings(max_examples=100, deadline=None)
@given(ends)
def test_an_end_event_decodes_to_the_same_values(end: server.EndData) -> None:
    same_values(client.EndData.from_json(json.loads(end.model_dump_json())), end)


def test_status_output_and_created_decode_to_the_same_values() -> None:
    for model in (server.StatusData(status=JobStatus.RUNNING),
                  server.OutputData(stream=OutputStream.STDERR, text="a\r\nb\x1b[31m\u2028"),
                  server.JobCreated(id="x"), server.JobCreated(id="y", status=JobStatus.RUNNING)):
        decoded = dict(PAIRS)[type(model)].from_json(json.loads(model.model_dump_json()))
        same_values(decoded, model)


# ------------------------------------------------------------------ what both refuse
GOOD_JOB = json.loads(server.JobView(
    id="j", status=JobStatus.COMPLETED, success=True, exit_code=0, reason=None,
    created_at=datetime(2025, 1, 1, tzinfo=UTC), start_time=None, end_time=None,
).model_dump_json())


@pytest.mark.parametrize("change", [
    {"status": "exploded"}, {"id": 5}, {"success": "maybe"}, {"exit_code": "zero"},
    {"created_at": "yesterday"}, {"created_at": None}, {"report": {"passed": 1}},
    {"report": {"passed": 1, "failed": 0, "errors": 0, "skipped": 0, "duration_s": "long"}},
])
def test_both_refuse_a_malformed_job(change: dict[str, object]) -> None:
    body = {**GOOD_JOB, **change}
    with pytest.raises(ValidationError):
        server.JobView.model_validate(body)
    with pytest.raises(ValueError, match=next(iter(change)) + "|passed|duration_s|failed"):
        client.JobView.from_json(body)


@pytest.mark.parametrize("missing", ["id", "status", "created_at", "start_time", "exit_code"])
def test_both_refuse_a_job_without_a_required_field(missing: str) -> None:
    body = {name: value for name, value in GOOD_JOB.items() if name != missing}
    with pytest.raises(ValidationError):
        server.JobView.model_validate(body)
    with pytest.raises(ValueError, match=f"{missing}: missing"):
        client.JobView.from_json(body)


def test_the_client_ignores_fields_it_does_not_know() -> None:
    # A newer server may add fields; pydantic ignores them too (its default `extra`).
    body = {**GOOD_JOB, "queue_position": 3}
    assert client.JobView.from_json(body).id == server.JobView.model_validate(body).id == "j"
