"""Property-based fuzzing of every operation against the spec the server publishes (schemathesis).

Each operation runs with alice's key, with no key, and with whatever Authorization header
schemathesis makes up; in positive mode (inputs the spec allows) and negative mode (inputs it
forbids). Often the job id is a real one from the seeded database (ended, running, queued, or
another user's), so requests reach jobs rather than only 404s. Every answer must:
not be a 5xx, have a documented status code and content type, match its schema, and, for an
error, be `{"detail": "<one line>"}`; and the server must log no traceback (the `api` fixture).
Examples and seed: tests/api/fuzzing.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import schemathesis
from hypothesis import event, given
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from ci_common.settings import Settings
from ci_persistence.memory import InMemoryRepository
from ci_server.app import create_app
from tests.api.conftest import SERVER_ENV, LiveApi
from tests.api.fuzzing import PLAN

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(PLAN.timeout_s)]

# negative_data_rejection: what the spec forbids (a timeout over the maximum) is refused.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]
JOB_ID = "job_id"
# The stream of a job that has not ended stays open; the fuzzer reads each answer whole.
STREAMING = "GET /jobs/{job_id}/events"
REQUEST_TIMEOUT_S = 10
AUTH_VARIANTS = ("key", "no key", "made-up key")
Operation = APIOperation[Any, Any, Any, Any]

# The same code and settings as the server's, so the operations are known when tests are
# collected; test_the_served_spec_is_the_one_fuzzed checks that the server publishes it.
EXPECTED_SPEC = create_app(Settings.from_env(SERVER_ENV), InMemoryRepository()).openapi()
OPERATIONS = [f"{method.upper()} {path}" for path, item in EXPECTED_SPEC["paths"].items()
              for method in item]


@pytest.fixture(scope="module")
def schema(live_api: LiveApi) -> schemathesis.BaseSchema:
    # An explicit config: none is read from a schemathesis.toml lying around.
    return schemathesis.openapi.from_url(f"{live_api.url}/openapi.json",
                                         config=schemathesis.Config())


def test_the_served_spec_is_the_one_fuzzed(api: LiveApi, schema: schemathesis.BaseSchema) -> None:
    assert schema.raw_schema == json.loads(json.dumps(EXPECTED_SPEC))


def job_ids(api: LiveApi, label: str) -> list[str]:
    """The seeded job ids worth sending to this operation."""
    seed = api.seed
    ids = [*seed.ended_jobs, *seed.others_jobs]
    if label != STREAMING:
        ids += seed.open_jobs
    return ids


def cases(operation: Operation, mode: GenerationMode, real_ids: list[str],
          headers: dict[str, str]) -> Any:
    """Cases as schemathesis generates them, many of them for a real job id if there is one.

    `headers` are fixed, so negative mode never picks them to make invalid. Real ids come first:
    Hypothesis favours the first branch of one_of.
    """
    generated = operation.as_strategy(generation_mode=mode, headers=headers)
    if not any(p.name == JOB_ID for p in operation.iter_parameters()):
        return generated
    with_real_id = st.sampled_from(real_ids).flatmap(
        lambda job_id: operation.as_strategy(generation_mode=mode, headers=headers,
                                             path_parameters={JOB_ID: job_id}))
    return st.one_of(with_real_id, generated)


def can_be_negated(operation: Operation, headers: dict[str, str]) -> bool:
    """Whether negative mode has an input to make invalid: a body, or a query or header
    parameter that is not fixed (a job id is any string: nothing to break there)."""
    fixed = {name.lower() for name in headers}
    return bool(operation.body) or any(
        p.location.value != "path" and p.name.lower() not in fixed
        for p in operation.iter_parameters())


def fixed_headers(auth: str, key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if auth == "key" else {}


def drop_key(case: Case[Any], auth: str) -> None:
    """For "no key", remove the Authorization header schemathesis made up."""
    if auth == "no key" and case.headers is not None:
        case.headers.pop("Authorization", None)  # case-insensitive


def check_one_line_error(response: Any) -> None:
    if response.status_code < 400:
        return
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"detail"}, body
    assert isinstance(body["detail"], str) and "\n" not in body["detail"], body


@pytest.mark.parametrize("auth", AUTH_VARIANTS)
@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzz_operation(api: LiveApi, schema: schemathesis.BaseSchema, label: str,
                        auth: str) -> None:
    operation = schema.find_operation_by_label(label)
    assert operation is not None, label
    headers = fixed_headers(auth, api.seed.alice.key)
    # Without a valid key nearly every path ends at the same 401: fewer examples find as much.
    examples = PLAN.examples if auth == "key" else max(PLAN.examples // 2, 1)
    modes = [GenerationMode.POSITIVE]
    if can_be_negated(operation, headers):
        modes.append(GenerationMode.NEGATIVE)
    for mode in modes:
        @given(case=cases(operation, mode, job_ids(api, label), headers))
        def call(case: Case[Any]) -> None:
            drop_key(case, auth)
            response = case.call(base_url=api.url, timeout=REQUEST_TIMEOUT_S)
            event(f"answered {response.status_code}")  # --hypothesis-show-statistics
            case.validate_response(response, checks=CHECKS)
            check_one_line_error(response)

        try:
            PLAN.apply(call, examples=examples)()
        except BaseException as exc:
            exc.add_note(f"{label}, {auth}, {mode.value} mode")
            PLAN.note(exc)
            raise
