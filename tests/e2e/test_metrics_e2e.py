"""Prometheus metrics of a real server replica and a real controller, moving with a real job."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.docker_proxy import DockerProxy
from tests.e2e.harness import Deployment, LineReader, free_port, write_project

pytestmark = pytest.mark.docker

# Prints a line, then keeps running long enough to be scraped while it runs.
SLOW_TEST = (
    "import time\n"
    "def test_slow():\n"
    "    print('started', flush=True)\n"
    "    time.sleep(3)\n"
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample at `url`/metrics, keyed by (name, sorted labels)."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_server_and_controller_metrics_follow_a_real_job(deployment: Deployment,
                                                         tmp_path: Path) -> None:
    dep = deployment
    metrics_port = free_port()
    controller = dep.start_controller(CI_METRICS_PORT=str(metrics_port))
    controller_url = f"http://127.0.0.1:{metrics_port}"
    server = dep.start_server()
    user = dep.create_user()

    before = scrape(server.url)
    assert {value(before, "ci_jobs", status=s) for s in
            ("queued", "running", "completed", "failed", "cancelled")} == {0}
    assert value(before, "ci_queue_depth") == 0
    assert value(before, "ci_sse_watchers") == 0
    assert value(before, "ci_auth_failures_total") == 0
    idle = scrape(controller_url)
    assert value(idle, "ci_controller_running_jobs") == 0
    assert value(idle, "ci_container_start_seconds_count") == 0

    refused = dep.ci("list", server=server, api_key="ci_" + "x" * 43)
    assert refused.returncode != 0 and "API key" in refused.stderr, refused.stderr
    assert value(scrape(server.url), "ci_auth_failures_total") == 1

    project = write_project(tmp_path / "slow", {"test_slow.py": SLOW_TEST}, capture=False)
    reader = LineReader(dep.ci_popen("submit", "test", cwd=project, server=server,
                                     api_key=user.api_key))
    try:
        reader.wait_for("started")
        during = scrape(server.url)
        assert value(during, "ci_sse_watchers") == 1  # the `ci submit test` streaming now
        assert value(during, "ci_jobs", status="running") == 1
        running = scrape(controller_url)
        assert value(running, "ci_controller_running_jobs") == 1
        assert value(running, "ci_container_start_seconds_count") == 1
        assert 0 < value(running, "ci_container_start_seconds_sum") < 30
    finally:
        out, err, code = reader.finish()
    assert code == 0, err

    after = scrape(server.url)
    assert value(after, "ci_jobs", status="completed") == 1
    assert value(after, "ci_jobs", status="running") == 0
    assert value(after, "ci_sse_watchers") == 0
    # The client is done at the verdict; the controller then removes the container.
    wait_until(lambda: value(scrape(controller_url), "ci_controller_running_jobs") == 0, 20,
               "the controller to let go of the job")
    done = scrape(controller_url)
    assert value(done, "ci_job_duration_seconds_count", status="completed") == 1
    assert value(done, "ci_job_duration_seconds_sum", status="completed") >= 3
    assert controller.popen.poll() is None


def test_controller_metrics_port_in_use_is_one_line_and_exit_1(deployment: Deployment) -> None:
    dep = deployment
    server = dep.start_server()  # holds its port
    taken = server.url.rsplit(":", 1)[1]
    result = subprocess.run([sys.executable, "-m", "ci_controller"], capture_output=True,
                            text=True, timeout=60, cwd=dep.workdir,
                            env=dep.env(CI_METRICS_PORT=taken))
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: cannot serve metrics on port {taken}: ")
    assert result.stderr.count("\n") == 1, result.stderr


def test_engine_errors_are_counted_while_the_engine_is_away(deployment: Deployment,
                                                            proxy: DockerProxy) -> None:
    dep = deployment
    metrics_port = free_port()
    dep.start_controller(DOCKER_HOST=proxy.url, CI_METRICS_PORT=str(metrics_port))
    url = f"http://127.0.0.1:{metrics_port}"
    wait_until(lambda: proxy.connections > 0, 20, "the controller to reach the engine")
    assert value(scrape(url), "ci_engine_errors_total") == 0
    proxy.cut()
    try:
        # Probed once per reconcile interval (1 s here): it counts every failed probe.
        wait_until(lambda: value(scrape(url), "ci_engine_errors_total") >= 2, 20,
                   "engine errors to be counted")
    finally:
        proxy.restore()
