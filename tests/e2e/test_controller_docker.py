"""The controller alone against the real Docker engine, the runner image and a SQLite file.

Each test gets its own database, controller id and container prefix; a finalizer removes every
container carrying its controller id label. Output of these tests (-s) includes the measured
claim → container-start time and the print → stored line latency.
"""

from __future__ import annotations

import contextlib
import io
import re
import statistics
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest

from ci_common.models import EventKind, Job, JobStatus
from ci_common.settings import Settings
from ci_controller.docker_runtime import DockerRuntime
from ci_controller.reconciler import Controller
from ci_persistence.sqlite import SqliteRepository
from tests.e2e.harness import remove_volumes
from tests.leases import hold_lease

pytestmark = pytest.mark.docker

JOB_DEADLINE_S = 90.0

CALC = "def add(a, b):\n    return a + b\n"
PASSING_TEST = """\
from calc import add


def test_add():
    assert add(2, 3) == 5


def test_can_write_tmp_path(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    assert (tmp_path / "f.txt").read_text() == "x"
"""
FAILING_TEST = "from calc import add\n\n\ndef test_add():\n    assert add(2, 2) == 5\n"
# capsys.disabled(): the lines go to the job's output live, not into pytest's capture.
NUMBERED_TEST = """\
import time


def test_numbered(capsys):
    with capsys.disabled():
        print()  # end pytest's "test_numbered " progress line first
        for i in range(1, {count} + 1):
            print(f"line {{i}}")
            if {pause}:
                time.sleep({pause})
        for i in range({ticks}):
            print(f"tick {{i}} {{time.time():.6f}}")
            time.sleep(0.05)
"""
SLOW_TEST = "import time\n\n\ndef test_slow():\n    time.sleep(120)\n"


def project_zip(test_source: str, requirements: str = "pytest\n") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("src/calc.py", CALC)
        zf.writestr("tests/test_project.py", test_source)
        zf.writestr("requirements.txt", requirements)
    return buffer.getvalue()


@dataclass
class Deployment:
    """A database, the settings for one controller id, and the controllers started on them."""

    settings: Settings
    repository: SqliteRepository
    running: list[tuple[Controller, threading.Event, threading.Thread]] = field(
        default_factory=list)

    def start_controller(self) -> Controller:
        repository = SqliteRepository(self.settings.db_path)
        controller = Controller(self.settings, repository, DockerRuntime(),
                                fence=hold_lease(repository, self.settings.controller_id))
        stop = threading.Event()
        thread = threading.Thread(target=controller.run_forever, args=(stop,), daemon=True)
        thread.start()
        self.running.append((controller, stop, thread))
        return controller

    def stop_controller(self, controller: Controller) -> None:
        """Warm stop: the Controller goes away, its containers are left as they are."""
        for entry in self.running:
            if entry[0] is controller:
                entry[1].set()
                entry[2].join(30)
                assert not entry[2].is_alive()
                self.running.remove(entry)
                return

    def submit(self, archive: bytes, timeout: float | None = None) -> Job:
        user = self.repository.create_user("e2e", f"{uuid.uuid4().hex[:8]}@example.com")
        return self.repository.create_job(user.id, archive, timeout)

    def wait(self, job_id: str, predicate: object = None,
             timeout: float = JOB_DEADLINE_S) -> Job:
        deadline = time.monotonic() + timeout
        while True:
            job = self.repository.get_job(job_id)
            done = job.status.is_terminal if predicate is None else predicate(job)  # type: ignore[operator]
            if done:
                return job
            assert time.monotonic() < deadline, f"job {job_id} stuck: {job}"
            time.sleep(0.02)

    def output(self, job_id: str) -> str:
        return "".join(e.text for e in self.repository.list_events(job_id, limit=100_000)
                       if e.kind is EventKind.OUTPUT)


@pytest.fixture
def deployment(tmp_path: Path, runner_image: str, ca_bundle: str | None) -> Iterator[Deployment]:
    tag = uuid.uuid4().hex[:10]
    settings = Settings.from_env(
        {}, db_path=str(tmp_path / "ci.db"), runner_image=runner_image, ca_bundle=ca_bundle,
        container_prefix=f"ci_ctl_e2e_{tag}_", controller_id=f"ctl-e2e-{tag}",
        reconcile_interval_s=1.0, cancel_grace_s=5.0, job_timeout_s=JOB_DEADLINE_S,
        job_memory_bytes=1024**3)
    dep = Deployment(settings=settings, repository=SqliteRepository(settings.db_path))
    try:
        yield dep
    finally:
        for _controller, stop, thread in dep.running:
            stop.set()
            thread.join(30)
        remove_containers(dep.repository.installation_id())
        remove_volumes(f"ci.installation_id={dep.repository.installation_id()}",
                       settings.container_prefix)  # its jobs' cached environments
        dep.repository.close()


def remove_containers(installation_id: str) -> None:
    """Remove every container of this installation (some may be going already)."""
    api = docker.from_env().api
    label = {"label": f"ci.installation_id={installation_id}"}
    deadline = time.monotonic() + 30
    # The low-level listing: the high-level one inspects each container and trips over one
    # the controller removes at the same moment.
    while containers := api.containers(all=True, filters=label):
        for container in containers:
            # removal may already be in progress (the controller's own), or just done
            with contextlib.suppress(docker.errors.APIError):
                api.remove_container(container["Id"], force=True)
        assert time.monotonic() < deadline, "containers left behind"
        time.sleep(0.1)


def test_passing_project(deployment: Deployment) -> None:
    controller = deployment.start_controller()
    submitted = time.monotonic()
    job = deployment.submit(project_zip(PASSING_TEST))
    running = deployment.wait(job.id, lambda j: j.status is not JobStatus.QUEUED)
    to_running = time.monotonic() - submitted
    done = deployment.wait(job.id)
    output = deployment.output(job.id)
    assert (done.status, done.success, done.exit_code, done.reason) == (
        JobStatus.COMPLETED, True, 0, None), output
    assert running.status in (JobStatus.RUNNING, JobStatus.COMPLETED)
    assert "test_add PASSED" in output and "test_can_write_tmp_path PASSED" in output
    assert "Successfully installed" in output  # pip ran as root with every capability dropped
    deadline = time.monotonic() + 10
    while not (latencies := controller.start_latencies_s):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    print(f"\nclaim -> container started: {latencies[0] * 1000:.0f} ms; "
          f"submit -> running: {to_running * 1000:.0f} ms")
    assert to_running < 5.0


def test_failing_project(deployment: Deployment) -> None:
    deployment.start_controller()
    job = deployment.submit(project_zip(FAILING_TEST))
    done = deployment.wait(job.id)
    output = deployment.output(job.id)
    assert (done.status, done.success, done.exit_code) == (JobStatus.COMPLETED, False, 1), output
    assert "test_add FAILED" in output
    assert "assert 4 == 5" in output


def test_requirements_that_cannot_be_installed(deployment: Deployment) -> None:
    deployment.start_controller()
    job = deployment.submit(project_zip(FAILING_TEST,
                                        "pytest\nci-no-such-package-7f3a9==0.0.1\n"))
    done = deployment.wait(job.id)
    output = deployment.output(job.id)
    assert (done.status, done.success, done.reason) == (
        JobStatus.FAILED, False, "dependency installation failed"), output
    assert "ERROR: No matching distribution found for ci-no-such-package-7f3a9" in output
    assert "test session starts" not in output


def test_numbered_lines_arrive_complete_and_in_order(deployment: Deployment) -> None:
    deployment.start_controller()
    count = 3000
    job = deployment.submit(project_zip(NUMBERED_TEST.format(count=count, pause=0, ticks=40)))
    done = deployment.wait(job.id)
    assert done.status is JobStatus.COMPLETED and done.success, deployment.output(job.id)
    numbers = [int(m) for m in re.findall(r"^line (\d+)$", deployment.output(job.id), re.M)]
    assert numbers == list(range(1, count + 1))
    # Latency: each tick line carries the time it was printed; its event the time it was stored.
    delays = []
    for event in deployment.repository.list_events(job.id, limit=100_000):
        for printed in re.findall(r"^tick \d+ (\d+\.\d+)$", event.text, re.M):
            delays.append(event.created_at.timestamp() - float(printed))
    assert len(delays) == 40
    p50, worst = statistics.median(delays), max(delays)
    print(f"\nprint -> stored line latency over {len(delays)} idle lines: "
          f"p50 {p50 * 1000:.1f} ms, max {worst * 1000:.1f} ms")
    assert p50 < 0.1


def test_crashed_controller_is_adopted_with_every_line_once(deployment: Deployment) -> None:
    count = 80
    first = deployment.start_controller()
    job = deployment.submit(project_zip(NUMBERED_TEST.format(count=count, pause=0.03, ticks=0)))
    deployment.wait(job.id, lambda j: "line 10\n" in deployment.output(j.id))
    deployment.stop_controller(first)  # the container is not touched
    stored_before = deployment.repository.get_job(job.id)
    assert stored_before.status is JobStatus.RUNNING
    time.sleep(0.5)  # lines keep coming while no controller follows them
    deployment.start_controller()
    done = deployment.wait(job.id)
    output = deployment.output(job.id)
    assert (done.status, done.success) == (JobStatus.COMPLETED, True), output
    numbers = [int(m) for m in re.findall(r"^line (\d+)$", output, re.M)]
    assert numbers == list(range(1, count + 1))
    assert output.count("test_numbered") == 1


def test_cancel_stops_the_container_promptly(deployment: Deployment) -> None:
    deployment.start_controller()
    job = deployment.submit(project_zip(SLOW_TEST))
    deployment.wait(job.id, lambda j: "test_slow" in deployment.output(j.id))
    asked = time.monotonic()
    deployment.repository.request_cancel(job.id, job.user_id)
    done = deployment.wait(job.id)
    elapsed = time.monotonic() - asked
    assert (done.status, done.reason) == (JobStatus.CANCELLED, "cancelled by user")
    # the runner handles SIGTERM itself: no waiting out the grace period for a SIGKILL
    assert elapsed < deployment.settings.cancel_grace_s, elapsed


def test_timeout_kills_the_container(deployment: Deployment) -> None:
    deployment.start_controller()
    job = deployment.submit(project_zip(SLOW_TEST), timeout=8.0)
    done = deployment.wait(job.id)
    assert (done.status, done.reason) == (JobStatus.FAILED, "timed out")
    assert done.end_time is not None and done.start_time is not None
    assert 8.0 <= (done.end_time - done.start_time).total_seconds() < 20
