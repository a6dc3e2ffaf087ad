"""Several Docker hosts: two engines, a controller on each, two server replicas, one database.

Each extra engine (scripts/docker-engines) stands for one Docker host; the controllers differ
only in DOCKER_HOST and CI_CONTROLLER_ID. Checked from the outside (HTTP, SSE, each engine's
own start events, `ci-admin controller list`):

1. jobs spread over both hosts, each job's container starts exactly once on one engine, and
   every log is complete and in order;
2. host 1's controller killed for good (kill -9, never restarted): within one lease the
   controller on host 2 deals with its jobs as the ownership design says
   (ci_controller/takeover.py): a job whose container runs on host 1 fails as `controller
   lost` (host 2 cannot see that container), nothing is started twice, and the jobs queued
   behind them and those submitted after the kill all run on host 2, once each.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.e2e.crash_helpers import assert_no_traceback, wait_until
from tests.e2e.harness import Deployment, on_both_backends, zip_project
from tests.e2e.hosts import (
    EngineStarts,
    api_client,
    docker_engines,
    engine_id,
    job_views,
    lines_of,
    read_log,
    submit,
    tagged_project,
    wait_terminal,
)

pytestmark = pytest.mark.docker

LEASE_S = 4.0  # CI_CONTROLLER_LEASE: a gone host is noticed quickly
RECONCILE_S = 1.0  # the harness's CI_RECONCILE_INTERVAL: how often a controller looks
SLACK_S = 3.0  # a loaded 2-core machine: polls, the API round trip
SHORT_JOBS = 4  # each controller takes at most 2 at once: both hosts get some
SHORT_LINES = 5
SLOW_JOBS = 4
SLOW_LINES = 30  # at 0.2 s apart: still printing when its controller is killed
AFTER_KILL_JOBS = 2
HOST_LIMIT = 2  # CI_MAX_CONCURRENT_JOBS of each controller


@pytest.fixture(scope="module")
def engines(runner_image: str) -> Iterator[list[str]]:
    """Two extra Docker engines (two "hosts"), removed after the module, pass or fail."""
    with docker_engines(2, runner_image) as hosts:
        yield hosts


@on_both_backends
@pytest.mark.timeout(300)
def test_two_hosts_share_jobs_and_a_dead_hosts_jobs_are_dealt_with(
        deployment: Deployment, engines: list[str], tmp_path: Path) -> None:
    dep = deployment
    host1, host2 = engines
    assert engine_id(host1) != engine_id(host2)  # else the controllers would share "a host"
    replicas = [dep.start_server(), dep.start_server()]
    urls = [str(replica.url) for replica in replicas]
    ids = [f"host1-{dep.run_id}", f"host2-{dep.run_id}"]
    controllers = [dep.start_controller(DOCKER_HOST=host, CI_CONTROLLER_ID=cid,
                                        CI_CONTROLLER_LEASE=str(LEASE_S),
                                        CI_MAX_CONCURRENT_JOBS=str(HOST_LIMIT))
                   for host, cid in zip(engines, ids, strict=True)]
    user = dep.create_user()
    client = api_client(user.api_key)
    watch = EngineStarts(engines, dep.label())
    tags: dict[str, str] = {}  # job id → the tag its test prints

    def submit_tagged(tag: str, lines: int, delay_s: float = 0.0) -> str:
        archive = zip_project(tagged_project(tmp_path / tag, tag, lines, delay_s))
        job_id = submit(client, urls[len(tags) % 2], archive)
        tags[job_id] = tag
        return job_id

    def log_lines(job_id: str) -> list[int]:
        text, kinds = read_log(client, urls[1 - list(tags).index(job_id) % 2], job_id)
        assert kinds[-1] == "end", (job_id, kinds)
        return lines_of(tags[job_id], text)

    def alive() -> dict[str, bool]:
        rows = json.loads(dep.admin("controller", "list", "--json").stdout)
        return {str(row["id"]): bool(row["alive"]) for row in rows}

    try:
        # Both controllers hold their lease before any job exists, so both compete for them.
        wait_until(lambda: all(alive().get(cid) for cid in ids), 30, "both controllers", 0.2)
        # 1. Jobs spread over both hosts, each runs once, every log complete and in order.
        short = {submit_tagged(f"short-{n}", SHORT_LINES) for n in range(SHORT_JOBS)}
        views = wait_terminal(client, urls[0], short, timeout=150)
        assert all((v["status"], v["success"]) == ("completed", True)
                   for v in views.values()), views
        time.sleep(0.5)  # the last start events are in flight
        assert {job_id: watch.per_job()[job_id] for job_id in short} == dict.fromkeys(short, 1)
        spread = watch.hosts_of(short)
        assert spread[host1] >= 1 and spread[host2] >= 1, spread
        for job_id in short:
            assert log_lines(job_id) == list(range(1, SHORT_LINES + 1)), job_id

        # 2. Host 1's controller dies for good while its containers run.
        slow = {submit_tagged(f"slow-{n}", SLOW_LINES, 0.2) for n in range(SLOW_JOBS)}

        def running_on_host1() -> set[str]:
            started = {s.job_id for s in watch.starts() if s.host == host1 and s.job_id in slow}
            views = job_views(client, urls[0])
            return {job_id for job_id in started if views[job_id]["status"] == "running"}

        # Killed once both its slots run (it claims nothing more), so which jobs are lost is
        # known: a kill in the instant between a container's start attempt and its `running`
        # mark would fail that job as controller lost too (it may run; never twice).
        wait_until(lambda: len(running_on_host1()) == HOST_LIMIT, 90,
                   "host 1's controller to run two slow jobs", 0.2)
        on_host1 = running_on_host1()
        controllers[0].kill9()
        killed_at = time.time()
        later = {submit_tagged(f"later-{n}", SHORT_LINES) for n in range(AFTER_KILL_JOBS)}
        views = wait_terminal(client, urls[1], slow | later, timeout=150)

        # Its running jobs: failed as controller lost, by host 2's controller, within a lease.
        for job_id in on_host1:
            view = views[job_id]
            assert (view["status"], view["success"]) == ("failed", False), view
            assert view["reason"].startswith(
                f"controller lost: controller '{ids[0]}' on "), view
            dealt_s = datetime.fromisoformat(view["end_time"]).timestamp() - killed_at
            assert dealt_s <= LEASE_S + RECONCILE_S + SLACK_S, (job_id, dealt_s)
            printed = log_lines(job_id)  # what it printed before: in order, nothing twice
            assert printed == list(range(1, len(printed) + 1)), printed
        # Every other job, queued or on host 2 at the kill or submitted after it: completed,
        # started once, log complete.
        time.sleep(0.5)
        starts = watch.per_job()
        for job_id in (slow - on_host1) | later:
            view = views[job_id]
            assert (view["status"], view["success"]) == ("completed", True), view
            lines = SLOW_LINES if job_id in slow else SHORT_LINES
            assert log_lines(job_id) == list(range(1, lines + 1)), job_id
        assert {job_id: starts[job_id] for job_id in slow | later} == dict.fromkeys(
            slow | later, 1)
        assert watch.hosts_of(later) == {host2: AFTER_KILL_JOBS}
        assert not watch.hosts_of(on_host1)[host2]  # a lost job is not started again

        rows = {row["id"]: row for row in json.loads(
            dep.admin("controller", "list", "--json").stdout)}
        assert (rows[ids[0]]["alive"], rows[ids[0]]["running_jobs"]) == (False, 0)
        assert rows[ids[1]]["alive"] is True
        assert_no_traceback(controllers[1])
        for replica in replicas:
            assert "Traceback" not in replica.log()
        print(f"\nseveral hosts ({dep.backend}): short jobs per host {dict(spread)}; "
              f"{len(on_host1)} running job(s) on the killed host failed as controller lost "
              f"{dealt_s:.1f} s after the kill (lease {LEASE_S:g} s)")
    finally:
        watch.close()
        client.close()
