"""Several Docker hosts on one machine, for the e2e test and the load bench.

`docker_engines(n, image)` starts n extra engines with scripts/docker-engines (a set of its
own, so parallel tests keep apart) and removes them afterwards, whatever happened. Each engine
stands for one Docker host: a controller is pointed at it with DOCKER_HOST. `EngineStarts`
records, from each engine's own event stream, which job's container started where and when.
The rest reads jobs the way users do: over HTTP, logs over SSE.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import httpx
from httpx_sse import connect_sse

from tests.e2e.harness import REPO_ROOT, write_project

ENGINES_SCRIPT = REPO_ROOT / "scripts" / "docker-engines"
TERMINAL = ("completed", "failed", "cancelled")
# pytest 8.4+ pulls in pygments (thousands of files to install per job); 8.3's install is
# a third of the cost, and the cost here is the machine's two cores.
REQUIREMENTS = "pytest==8.3.5\n"


@contextmanager
def docker_engines(count: int, image: str) -> Iterator[list[str]]:
    """Start `count` extra engines holding `image`; their DOCKER_HOST values. Always stopped."""
    set_name = f"t{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        started = subprocess.run([str(ENGINES_SCRIPT), "start", str(count), "--set", set_name,
                                  "--image", image, "--owner-pid", str(os.getpid())],
                                 capture_output=True, text=True,
                                 timeout=300)
        if started.returncode != 0:
            raise RuntimeError(f"scripts/docker-engines start failed:\n{started.stderr[-3000:]}")
        hosts = started.stdout.split()
        assert len(hosts) == count, started.stdout
        yield hosts
    finally:
        stopped = subprocess.run([str(ENGINES_SCRIPT), "stop", "--set", set_name],
                                 capture_output=True, text=True, timeout=300)
        if stopped.returncode != 0:
            raise RuntimeError(f"scripts/docker-engines stop failed:\n{stopped.stderr[-3000:]}")


def engine_id(host: str) -> str:
    client = docker.DockerClient(base_url=host)
    try:
        return str(client.info()["ID"])
    finally:
        client.close()


@dataclass(frozen=True)
class Start:
    host: str
    job_id: str
    controller_id: str
    at: float  # time.time() of the engine's start event


class EngineStarts:
    """Container start events of one installation on several engines, streamed from now on.

    Subscribed before the first job: an engine keeps only its last 256 events.
    """

    def __init__(self, hosts: list[str], label: str) -> None:
        self.hosts = hosts
        self._starts: list[Start] = []
        self._lock = threading.Lock()
        self._clients = [docker.DockerClient(base_url=host) for host in hosts]
        self._streams = [client.events(since=datetime.now(UTC), decode=True,
                                       filters={"type": "container", "event": "start",
                                                "label": label})
                         for client in self._clients]
        self._threads = [threading.Thread(target=self._read, args=(host, stream), daemon=True)
                         for host, stream in zip(hosts, self._streams, strict=True)]
        for thread in self._threads:
            thread.start()

    def _read(self, host: str, stream: Any) -> None:
        try:
            for event in stream:
                labels = event["Actor"]["Attributes"]
                with self._lock:
                    self._starts.append(Start(host, labels.get("ci.job_id", ""),
                                              labels.get("ci.controller_id", ""),
                                              event["timeNano"] / 1e9))
        except Exception:  # noqa: BLE001 - close() ends the read this way
            pass

    def starts(self) -> list[Start]:
        with self._lock:
            return list(self._starts)

    def per_job(self) -> Counter[str]:
        """How many times each job's container was started, over all engines."""
        return Counter(start.job_id for start in self.starts())

    def hosts_of(self, job_ids: set[str]) -> Counter[str]:
        """How many of these jobs started on each engine."""
        return Counter(start.host for start in self.starts() if start.job_id in job_ids)

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
        for thread in self._threads:
            thread.join(10)
        for client in self._clients:
            client.close()


# ---------------------------------------------------------------------- jobs
def tagged_project(root: Path, tag: str, lines: int, delay_s: float = 0.0) -> Path:
    """A project whose one test prints `<tag> line <i> <time.time()>` for i = 1..lines, live."""
    test = (
        "import time\n"
        "def test_lines():\n"
        "    print()  # with -s, pytest's 'tests/x.py::test_lines ' shares the first line\n"
        f"    for i in range(1, {lines} + 1):\n"
        f"        print(f'{tag} line {{i}} {{time.time():.6f}}', flush=True)\n"
        f"        time.sleep({delay_s})\n"
    )
    return write_project(root, {"test_lines.py": test}, requirements=REQUIREMENTS,
                         capture=False)


def lines_of(tag: str, text: str) -> list[int]:
    """The line numbers `<tag> line N` in text, in the order they appear."""
    return [int(n) for n in re.findall(rf"^{re.escape(tag)} line (\d+) ", text, re.MULTILINE)]


def stamps_of(tag: str, text: str) -> list[float]:
    """The container's print times of the tagged lines in text."""
    return [float(t) for t in re.findall(rf"^{re.escape(tag)} line \d+ ([\d.]+)$", text,
                                         re.MULTILINE)]


def api_client(api_key: str) -> httpx.Client:
    return httpx.Client(headers={"Authorization": f"Bearer {api_key}"}, timeout=60)


def submit(client: httpx.Client, url: str, archive: bytes) -> str:
    response = client.post(f"{url}/jobs", files={"archive": ("p.zip", archive)})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def job_views(client: httpx.Client, url: str) -> dict[str, dict[str, Any]]:
    """Every job of the client's user, by id."""
    views: dict[str, dict[str, Any]] = {}
    while True:
        page = client.get(f"{url}/jobs", params={"limit": 200, "offset": len(views)})
        assert page.status_code == 200, page.text
        batch = page.json()["jobs"]
        views.update({job["id"]: job for job in batch})
        if not batch or len(views) >= page.json()["total"]:
            return views


def wait_terminal(client: httpx.Client, url: str, job_ids: set[str], timeout: float
                  ) -> dict[str, dict[str, Any]]:
    """Poll until every one of job_ids has ended; their views."""
    deadline = time.monotonic() + timeout
    while True:
        views = {job_id: view for job_id, view in job_views(client, url).items()
                 if job_id in job_ids}
        if len(views) == len(job_ids) and all(v["status"] in TERMINAL for v in views.values()):
            return views
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs not finished in {timeout} s: "
                                 f"{Counter(v['status'] for v in views.values())}")
        time.sleep(0.3)


def read_log(client: httpx.Client, url: str, job_id: str) -> tuple[str, list[str]]:
    """A finished job's whole output over SSE from the start, and the event kinds seen."""
    text: list[str] = []
    kinds: list[str] = []
    with connect_sse(client, "GET", f"{url}/jobs/{job_id}/events",
                     params={"since": "start"}) as source:
        assert source.response.status_code == 200, source.response.status_code
        for sse in source.iter_sse():
            kinds.append(sse.event)
            if sse.event == "output":
                text.append(json.loads(sse.data)["text"])
    return "".join(text), kinds
