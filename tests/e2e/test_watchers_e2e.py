"""Many watchers of one job on one replica, for real: each gets every event once, in order.

Half connect before the job prints (`since=start`), half join while it prints (`since=now`).
The replica reads the database once per change whatever the number of watchers, encodes each
event once and writes each watcher what is pending in one chunk; this checks that none of that
loses, repeats or reorders an event for anyone (tests/e2e/sse_watchers.py compares each
watcher with the job's stored events).
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import Deployment, numbered_lines_test, submit_async, write_project
from tests.e2e.sse_watchers import Watcher, problems, reference_events, watch

pytestmark = pytest.mark.docker

WATCHERS = 200
LINES = 150


async def _watch_all(url: str, key: str, job_id: str) -> tuple[list[Watcher], list[str]]:
    early = [Watcher("start") for _ in range(WATCHERS // 2)]
    late = [Watcher("now") for _ in range(WATCHERS // 2)]
    tasks = [asyncio.create_task(watch(url, key, job_id, w)) for w in early]
    async with asyncio.timeout(240):
        for watcher in early:
            await watcher.live.wait()
        # Join mid-job: once the first watcher has seen a third of the lines.
        third = f"line {LINES // 3}".encode()
        while not any(third in chunk for _, chunk in early[0].raw) and not tasks[0].done():
            await asyncio.sleep(0.01)
        tasks += [asyncio.create_task(watch(url, key, job_id, w)) for w in late]
        await asyncio.gather(*tasks)
        reference = await reference_events(url, key, job_id)
    return early + late, problems(early + late, reference)


def test_200_watchers_each_get_every_event_once_in_order(deployment: Deployment,
                                                        tmp_path: Path) -> None:
    deployment.start_controller()
    server = deployment.start_server()
    assert server.url is not None
    user = deployment.create_user()
    project = write_project(tmp_path / "p", {"test_lines.py": numbered_lines_test(LINES, 0.01)})
    job_id = submit_async(deployment, server, project, user.api_key)

    watchers, found = asyncio.run(_watch_all(server.url, user.api_key, job_id))

    assert found == []
    assert all(w.ended for w in watchers)
    # The late half really joined while the job printed: each missed the beginning.
    starts = [w.events()[0][0] for w in watchers[WATCHERS // 2:]]
    assert min(starts) > 3


def _watchers_gauge(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return next(sample.value for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name == "ci_sse_watchers")


def test_a_watcher_that_hangs_up_is_let_go_at_once(deployment: Deployment,
                                                   tmp_path: Path) -> None:
    """The stream is parked waiting for the relay (no controller: the job stays queued, and
    the keep-alive is 15 s away); closing the socket must still end it and its subscription
    now, not at the next write, which uvicorn would drop silently anyway."""
    dep = deployment
    server = dep.start_server()
    assert server.url is not None
    key = dep.create_user().api_key
    project = write_project(tmp_path / "p", {"test_p.py": "def test_p():\n    pass\n"})
    job_id = submit_async(dep, server, project, key)
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: {host}\r\n"
                     f"Authorization: Bearer {key}\r\n\r\n".encode())
        received = b""
        while b"streaming events after" not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        assert _watchers_gauge(server.url) == 1
    deadline = time.monotonic() + 5
    while _watchers_gauge(server.url) != 0:
        assert time.monotonic() < deadline, "the hung-up watcher is still subscribed"
        time.sleep(0.05)
