"""The controller's metrics against the fake runtime: what moves when a job runs, or the engine
is away."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from ci_common.errors import CIError, RuntimeUnavailable
from ci_common.models import JobStatus
from ci_controller.fake_runtime import FakeRuntime
from ci_controller.metrics import ControllerMetrics
from ci_controller.reconciler import Controller
from tests.unit.test_controller_reconciler import (
    PASSING,
    CountingRepository,
    finish,
    make_controller,
    submit,
)


@pytest.fixture
def made() -> Iterator[list[Controller]]:
    controllers: list[Controller] = []
    yield controllers
    for controller in controllers:
        controller.detach()


def sample(metrics: ControllerMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_a_finished_job_moves_start_latency_and_duration(made: list[Controller]) -> None:
    repo = CountingRepository()
    controller = make_controller(repo, FakeRuntime(default=PASSING), made)
    metrics = controller.metrics
    assert sample(metrics, "ci_controller_running_jobs") == 0
    job = submit(repo)
    controller.run_once()
    assert finish(controller, repo, job.id).status is JobStatus.COMPLETED
    assert sample(metrics, "ci_controller_running_jobs") == 0
    assert sample(metrics, "ci_container_start_seconds_count") == 1
    assert sample(metrics, "ci_job_duration_seconds_count", status="completed") == 1
    assert sample(metrics, "ci_engine_errors_total") == 0


def test_engine_errors_are_counted(made: list[Controller]) -> None:
    repo = CountingRepository()
    runtime = FakeRuntime(default=PASSING)
    runtime.fail["list"] = RuntimeUnavailable("engine went away")
    controller = make_controller(repo, runtime, made)
    submit(repo)
    controller.run_once()
    assert sample(controller.metrics, "ci_engine_errors_total") == 1
    assert repo.count_queued_jobs() == 1  # nothing claimed while the engine is away


def test_a_taken_port_is_one_clear_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(CIError, match=f"cannot serve metrics on port {port}: "):
            ControllerMetrics().serve(port, host="127.0.0.1")
