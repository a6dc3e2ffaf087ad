"""Load and fairness, end to end: 60 jobs from 3 users on 3 server replicas and 1 controller.

One scenario, checked from the outside (HTTP, the `ci` CLI and the Docker engine itself):
user A bursts 30 jobs through the API, user B submits 2 jobs through the CLI a moment later,
then B and C submit the other 28 concurrently, some through the CLI, the rest through the API.
With CI_MAX_CONCURRENT_JOBS=3:

- every job ran in exactly one container (Docker `start` events per `ci.job_id` label) and
  passed; every log holds its job's numbered lines exactly once, in order, and no other job's;
- each user lists exactly their own jobs on every replica (paginated) and with `ci list --json`;
- no request failed: every POST 201, no 5xx seen by the test nor logged by a replica, every CLI
  exit code 0;
- never more than 3 containers ran at once: sampled from `docker ps` every ~100 ms, and
  replayed from the engine's start/die event stream;
- A's burst does not starve B (criterion in `test_sixty_jobs_three_users_three_replicas`).

The run prints its numbers (wall time, jobs per minute, peak concurrency, fairness positions).
The cost is CPU: about 1.5 CPU-seconds per job (pip, pytest, container set-up), 2 cores.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from httpx_sse import connect_sse

from tests.e2e.harness import Deployment, Process, User, write_project, zip_project

pytestmark = pytest.mark.docker

LIMIT = 3  # CI_MAX_CONCURRENT_JOBS of the controller under test
BURST_A = 30  # user A's jobs, submitted at once before anyone else's
PROBES_B = 2  # user B's jobs submitted right after A's burst: the fairness probes
LATER_B = 13  # B's other jobs, submitted concurrently with C's
LATER_C = 15
LATER_CLI = 8  # of those 28, how many go through `ci submit test --async` (the rest: the API)
TOTAL = BURST_A + PROBES_B + LATER_B + LATER_C  # 60, the spec
# Fairness: B's probes must both start while at least this many of A's jobs have not started.
# Fair claiming (fewest active jobs per user first) starts them within the first ~10 starts;
# oldest-first claiming starts them after all 30 of A's.
A_LEFT_WAITING = 10
# pytest 8.4+ pulls in pygments, whose install (thousands of files, byte-compiled) costs 2-5 s
# more per job here than 8.3's three small dependencies: the pin halves the run's main cost.
REQUIREMENTS = "pytest==8.3.5\n"
LINES_PER_TEST = 4  # each job prints `<tag> line 1..4` in test_a.py and `5..8` in test_b.py
EXPECTED_LINES = list(range(1, 2 * LINES_PER_TEST + 1))
ANY_TAG_LINE = re.compile(r"^(job-\d+) line \d+$", re.MULTILINE)
# ~110 s on the 2-core machine beside other suites (load ~6), ~230 s at load ~15: bounded.
RUN_DEADLINE_S = 480.0
CLI_TIMEOUT_S = 120.0
TERMINAL = ("completed", "failed", "cancelled")


# ---------------------------------------------------------------------- helpers
def job_project(root: Path, tag: str) -> Path:
    """A short project whose two tests print `<tag> line N` (N = 1..8) live, with -s."""

    def test_file(first: int) -> str:
        return (
            "def test_lines():\n"
            "    print()  # with -s, pytest's 'tests/x.py::test_lines ' shares the first line\n"
            f"    for i in range({first}, {first + LINES_PER_TEST}):\n"
            f"        print(f'{tag} line {{i}}', flush=True)\n"
        )

    return write_project(root, {"test_a.py": test_file(1), "test_b.py": test_file(5)},
                         requirements=REQUIREMENTS, capture=False)


def lines_of(tag: str, text: str) -> list[int]:
    return [int(n) for n in re.findall(rf"^{re.escape(tag)} line (\d+)$", text, re.MULTILINE)]


def job_id_from(stdout: str) -> str:
    match = re.search(r"^Job submitted: (\S+)$", stdout, re.MULTILINE)
    assert match, f"no job id in {stdout!r}"
    return match.group(1)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a live process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class HttpLog:
    """Every HTTP status the test's own clients saw, for the no-5xx check."""

    def __init__(self) -> None:
        self.statuses: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()

    def hook(self, response: httpx.Response) -> None:
        with self._lock:
            self.statuses.append((response.request.method, response.request.url.path,
                                  response.status_code))

    def client(self, user: User) -> httpx.Client:
        return httpx.Client(headers={"Authorization": f"Bearer {user.api_key}"}, timeout=60,
                            event_hooks={"response": [self.hook]})


class EngineWatch:
    """Samples running containers every ~100 ms and records start/die events, in threads."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.samples: list[int] = []
        self.sample_errors: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._client = docker.from_env()
        # Streamed live from before the first job: a query after the run would not do, the
        # engine keeps only its last 256 events in memory (docker/docs#12509).
        self._stream = self._client.events(
            since=datetime.now(UTC), decode=True,
            filters={"type": "container", "event": ["start", "die"], "label": self.label})
        self._threads = [threading.Thread(target=self._sample, daemon=True),
                         threading.Thread(target=self._read_events, daemon=True)]
        for thread in self._threads:
            thread.start()

    def running_count(self) -> int:
        # sparse: one list call, no inspect per container (which races with removals)
        return len(self._client.containers.list(
            sparse=True, filters={"label": self.label, "status": "running"}))

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.running_count())
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.sample_errors.append(repr(exc))
            self._stop.wait(0.1)

    def _read_events(self) -> None:
        try:
            for event in self._stream:
                self.events.append(event)
        except Exception:  # noqa: BLE001 - stop() closes the stream under the reader
            pass

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._stream.close()
        for thread in self._threads:
            thread.join(timeout=10)
        self._client.close()

    def actions_per_job(self, action: str) -> Counter[str]:
        return Counter(event["Actor"]["Attributes"].get("ci.job_id", "")
                       for event in list(self.events) if event.get("Action") == action)

    def max_running_from_events(self) -> int:
        running = peak = 0
        # A start and a die at the same nanosecond count as overlapping (start first).
        for event in sorted(self.events, key=lambda e: (e["timeNano"], e["Action"] != "start")):
            running += 1 if event["Action"] == "start" else -1
            peak = max(peak, running)
        return peak


@pytest.fixture
def engine_watch(deployment: Deployment) -> Iterator[EngineWatch]:
    watch = EngineWatch(deployment.label())
    try:
        yield watch
    finally:
        watch.stop()


# ---------------------------------------------------------------------- the scenario
@pytest.mark.timeout(RUN_DEADLINE_S + 120)
def test_sixty_jobs_three_users_three_replicas(
    deployment: Deployment, engine_watch: EngineWatch, tmp_path: Path
) -> None:
    """The load scenario of the module docstring, and fairness.

    Fairness criterion: both of B's probes (submitted after all 30 of A's jobs were accepted)
    start, by start_time from the API, while at least A_LEFT_WAITING of A's jobs have not
    started, i.e. before A's 10th-from-last job. The one controller stamps every start_time,
    so their order is the order it started containers in. Oldest-first claiming would start
    all 30 of A's first; fewest-active-jobs-first starts a probe as soon as a slot frees
    (A holds all 3), the second one within a few more starts.
    """
    t_begin = time.monotonic()
    replicas: list[Process] = [deployment.start_server() for _ in range(3)]
    urls = [replica.url or "" for replica in replicas]
    deployment.start_controller(CI_MAX_CONCURRENT_JOBS=str(LIMIT))
    alice, bob, carol = users = [deployment.create_user() for _ in range(3)]
    http = HttpLog()
    clients = {user.email: http.client(user) for user in users}
    owner: dict[str, User] = {}  # job id → its user
    tag_of: dict[str, str] = {}  # job id → the tag its tests print
    cli_runs: list[tuple[list[str], int, str]] = []  # argv, exit code, stderr
    projects = [job_project(tmp_path / f"job-{n}", f"job-{n}") for n in range(TOTAL)]
    archives = [zip_project(project) for project in projects]
    lock = threading.Lock()

    def record(job_id: str, user: User, n: int) -> None:
        with lock:
            owner[job_id] = user
            tag_of[job_id] = f"job-{n}"

    def via_api(user: User, n: int) -> None:
        response = clients[user.email].post(f"{urls[n % 3]}/jobs",
                                            files={"archive": ("p.zip", archives[n])})
        assert response.status_code == 201, response.text
        record(response.json()["id"], user, n)

    def via_cli(user: User, n: int) -> subprocess.Popen[str]:
        servers = ",".join(urls[n % 3:] + urls[:n % 3])  # each replica gets its turn first
        return deployment.ci_popen("submit", "test", "--async", cwd=projects[n],
                                   server=servers, api_key=user.api_key)

    def finish_cli(popen: subprocess.Popen[str]) -> str:
        stdout, stderr = popen.communicate(timeout=CLI_TIMEOUT_S)
        cli_runs.append((list(popen.args), popen.returncode, stderr))  # type: ignore[arg-type]
        assert popen.returncode == 0, stderr
        return stdout

    t0 = time.monotonic()
    # 1. A's burst: 30 POSTs at once, spread over the replicas.
    with ThreadPoolExecutor(max_workers=10) as pool:
        list(pool.map(lambda n: via_api(alice, n), range(BURST_A)))
    burst_ids = set(owner)
    # 2. A moment later, B's two probes through the CLI.
    probes = [(n, via_cli(bob, n)) for n in range(BURST_A, BURST_A + PROBES_B)]
    for n, popen in probes:
        record(job_id_from(finish_cli(popen)), bob, n)
    probe_ids = set(owner) - burst_ids
    # 3. The other 28, B's and C's at the same time, through the CLI and the API.
    later = [(bob if i < LATER_B else carol, BURST_A + PROBES_B + i)
             for i in range(LATER_B + LATER_C)]
    random.Random(7).shuffle(later)
    popens = [(user, n, via_cli(user, n)) for user, n in later[:LATER_CLI]]
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda job: via_api(*job), later[LATER_CLI:]))
    for user, n, popen in popens:
        record(job_id_from(finish_cli(popen)), user, n)
    submitted_s = time.monotonic() - t0
    assert len(owner) == TOTAL

    # Wait for all to finish, polling the API (each user on another replica).
    deadline = t0 + RUN_DEADLINE_S
    while True:
        views: dict[str, dict[str, Any]] = {}
        for user, url in zip(users, urls, strict=True):
            page = clients[user.email].get(f"{url}/jobs", params={"limit": 500})
            assert page.status_code == 200, page.text
            views.update({job["id"]: job for job in page.json()["jobs"]})
        if all(job["status"] in TERMINAL for job in views.values()):
            break
        assert time.monotonic() < deadline, Counter(job["status"] for job in views.values())
        time.sleep(0.5)
    run_s = time.monotonic() - t0
    # The outcome is recorded at pytest's verdict; the container exits a moment after.
    settle = time.monotonic() + 30
    while (engine_watch.running_count() or engine_watch.actions_per_job("die")
           != engine_watch.actions_per_job("start")) and time.monotonic() < settle:
        time.sleep(0.1)
    engine_watch.stop()
    cpu = {f"{p.name}-{i}": round(cpu_seconds(p.popen.pid), 1)
           for i, p in enumerate(deployment.processes) if p.popen.poll() is None}

    # Every job ran exactly once, and passed.
    assert set(views) == set(owner)
    failed = {job_id: job for job_id, job in views.items()
              if job["status"] != "completed" or job["success"] is not True}
    assert not failed, failed
    starts = engine_watch.actions_per_job("start")
    assert set(starts) == set(owner), set(starts) ^ set(owner)
    assert all(count == 1 for count in starts.values()), starts
    assert engine_watch.actions_per_job("die") == starts  # the event stream is complete

    # The concurrency limit held, seen two ways, and was reached.
    assert not engine_watch.sample_errors, engine_watch.sample_errors[:3]
    assert len(engine_watch.samples) >= run_s * 2  # the sampler kept up through the run
    max_sampled = max(engine_watch.samples)
    max_evented = engine_watch.max_running_from_events()
    assert max_sampled <= LIMIT and max_evented <= LIMIT, (max_sampled, max_evented)
    assert max_evented == LIMIT

    # Fairness: A's burst did not starve B's probes.
    start_of = {job_id: datetime.fromisoformat(view["start_time"])
                for job_id, view in views.items()}
    order = sorted(views, key=lambda job_id: (start_of[job_id], job_id))
    probe_positions = sorted(order.index(job_id) + 1 for job_id in probe_ids)
    last_probe = max(start_of[job_id] for job_id in probe_ids)
    a_before = sum(1 for job_id in burst_ids if start_of[job_id] < last_probe)
    fairness = (f"B's probes started at positions {probe_positions} of {TOTAL}, after "
                f"{a_before} of A's {BURST_A} jobs")
    assert a_before <= BURST_A - A_LEFT_WAITING, fairness

    # Each user lists exactly their own jobs: every replica, paginated, and `ci list --json`.
    for user in users:
        own = {job_id for job_id, who in owner.items() if who is user}
        for url in urls:
            seen: list[str] = []
            while True:
                page = clients[user.email].get(f"{url}/jobs",
                                               params={"limit": 7, "offset": len(seen)})
                assert page.status_code == 200, page.text
                assert page.json()["total"] == len(own)
                batch = [job["id"] for job in page.json()["jobs"]]
                if not batch:
                    break
                seen += batch
            assert len(seen) == len(own) and set(seen) == own, url
    rng = random.Random(11)
    listings = [(user, deployment.ci_popen("list", "--json", "--limit", "100",
                                           server=rng.choice(urls), api_key=user.api_key))
                for user in users]
    # And one log per user through `ci wait --all`, on a random replica (checked below).
    waits = []
    for user in users:
        job_id = rng.choice(sorted(j for j, who in owner.items() if who is user))
        waits.append((job_id, deployment.ci_popen("wait", job_id, "--all",
                                                   server=rng.choice(urls),
                                                   api_key=user.api_key)))
    for user, popen in listings:
        listed = json.loads(finish_cli(popen))
        assert {job["id"] for job in listed} == {j for j, who in owner.items() if who is user}

    # Every log is complete: the job's own lines once each, in order, and no other job's.
    def log_of(job_id: str) -> str:
        text: list[str] = []
        kinds: list[str] = []
        with connect_sse(clients[owner[job_id].email], "GET",
                         f"{rng.choice(urls)}/jobs/{job_id}/events",
                         params={"since": "start"}) as source:
            assert source.response.status_code == 200
            for sse in source.iter_sse():
                kinds.append(sse.event)
                if sse.event == "output":
                    text.append(json.loads(sse.data)["text"])
        assert kinds[-1] == "end", (job_id, kinds)
        return "".join(text)

    with ThreadPoolExecutor(max_workers=6) as pool:
        logs = dict(zip(owner, pool.map(log_of, owner), strict=True))
    for job_id, text in logs.items():
        assert lines_of(tag_of[job_id], text) == EXPECTED_LINES, (job_id, text)
        assert set(ANY_TAG_LINE.findall(text)) == {tag_of[job_id]}, (job_id, text)
    for job_id, popen in waits:
        assert lines_of(tag_of[job_id], finish_cli(popen)) == EXPECTED_LINES, job_id

    # No request failed.
    posts = [status for method, _, status in http.statuses if method == "POST"]
    assert posts == [201] * (TOTAL - PROBES_B - LATER_CLI)
    assert not [entry for entry in http.statuses if entry[2] >= 500]
    assert len(cli_runs) == PROBES_B + LATER_CLI + 2 * len(users)
    assert all(code == 0 for _, code, _ in cli_runs)
    for replica in replicas:  # a 500 is logged with ERROR; a crash with a traceback
        log = replica.log()
        assert "ERROR" not in log and "Traceback" not in log, log[-3000:]

    print(f"\nload: {TOTAL} jobs submitted in {submitted_s:.1f} s, all finished {run_s:.1f} s "
          f"after the first POST ({TOTAL / run_s * 60:.0f} jobs/min); max running {max_sampled} "
          f"sampled ({len(engine_watch.samples)} samples), {max_evented} from events (limit "
          f"{LIMIT}); {fairness}; service CPU s {cpu}; test {time.monotonic() - t_begin:.0f} s")
