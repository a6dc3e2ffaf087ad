"""Load on several Docker hosts: replicas, one controller per engine, users, one database.

    .venv/bin/python bench/several_hosts.py [--jobs 120] [--backend both|sqlite|postgres]
                                            [--hosts 3] [--replicas 3] [--users 4]
                                            [--concurrency 2]

(also `bench/run.py --several-hosts`). The hosts are extra Docker engines on this machine
(scripts/docker-engines), a controller on each with its own DOCKER_HOST and controller id;
the database is PostgreSQL (a throwaway server, tests/postgres.py) or one SQLite file that
every process shares. The first user submits a burst of 3/8 of the jobs, then the others
submit the rest at once, all through the HTTP API, round robin over the replicas; every job
is followed live over SSE from its submission. Each job's test prints 10 numbered lines with
the container's clock. Checked (a failed check is printed and the exit code is 1):

- every job completed and passed, and its container started exactly once, on one engine
  (each engine's own start events);
- every log, live and read again afterwards, holds the job's lines once each, in order;
- fair turns: while every user had jobs waiting for a slot, each user got a fair share of
  the starts (within half to one and a half times 1/users; see `start_shares`);
- no 5xx answer seen by the clients, no ERROR or traceback in a replica's log.

Printed per backend: jobs/min (first submit → last end), submit latency p50/p95 (POST /jobs
round trip), line latency p50/p95 (container print → SSE client), the start shares, how the
jobs spread over the hosts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.backends import database  # noqa: E402
from tests.e2e.harness import Deployment, User, zip_project  # noqa: E402
from tests.e2e.hosts import (  # noqa: E402
    EngineStarts,
    docker_engines,
    lines_of,
    read_log,
    stamps_of,
    tagged_project,
    wait_terminal,
)

LINES = 10  # per job, 0.1 s apart
RUN_DEADLINE_S = 1800.0
MIN_WINDOW_STARTS = 20  # fewer starts while all users waited say nothing about fairness
FAIR_BAND = (0.5, 1.5)  # of the fair share 1/users, while all users had jobs waiting


@dataclass
class Result:
    backend: str
    jobs: int
    wall_s: float
    jobs_per_min: float
    submit_ms: list[float]
    line_ms: list[float]
    shares: dict[str, float]
    spread: dict[str, int]
    window: int  # starts while every user had jobs waiting (the fairness sample)
    failures: list[str] = field(default_factory=list)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


class Statuses:
    """Every HTTP status the bench's clients saw (for the no-5xx check)."""

    def __init__(self) -> None:
        self.seen: Counter[int] = Counter()
        self._lock = threading.Lock()

    def hook(self, response: httpx.Response) -> None:
        with self._lock:
            self.seen[response.status_code] += 1

    def client(self, user: User) -> httpx.Client:
        # A stream per job stays open from submission to end: more than httpx's 100 by default.
        return httpx.Client(headers={"Authorization": f"Bearer {user.api_key}"}, timeout=120,
                            limits=httpx.Limits(max_connections=400),
                            event_hooks={"response": [self.hook]})


class LiveLog:
    """One job's events followed over SSE from before it starts: text and arrival times."""

    def __init__(self, client: httpx.Client, url: str, job_id: str, tag: str) -> None:
        self.tag = tag
        self.text = ""
        self.kinds: list[str] = []
        self.latencies_ms: list[float] = []
        self.error: str | None = None
        self._args = (client, url, job_id)
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        client, url, job_id = self._args
        try:
            with connect_sse(client, "GET", f"{url}/jobs/{job_id}/events",
                             params={"since": "start"}) as source:
                for sse in source.iter_sse():
                    arrived = time.time()
                    self.kinds.append(sse.event)
                    if sse.event == "output":
                        chunk = json.loads(sse.data)["text"]
                        self.text += chunk
                        self.latencies_ms += [(arrived - stamp) * 1000
                                              for stamp in stamps_of(self.tag, chunk)]
        except Exception as exc:  # noqa: BLE001 - reported as a failed check
            self.error = repr(exc)


def submissions(jobs: int, users: int) -> tuple[int, list[int]]:
    """The first user's burst, and how many each later user submits."""
    burst = jobs * 3 // 8
    rest = jobs - burst
    later = [rest // (users - 1) + (1 if n < rest % (users - 1) else 0)
             for n in range(users - 1)]
    return burst, later


def judged_window(views: dict[str, dict[str, Any]], owner: dict[str, str]
                  ) -> tuple[datetime, datetime]:
    """While every user had a job waiting for a slot.

    From the first slot freed after every user had submitted (starts before it went to free
    slots, which the burst fills before the others arrive) until the first user's last start.
    """
    by_user: dict[str, list[dict[str, Any]]] = {}
    for job_id, view in views.items():
        by_user.setdefault(owner[job_id], []).append(view)
    created = {u: min(datetime.fromisoformat(v["created_at"]) for v in vs)
               for u, vs in by_user.items()}
    last_start = {u: max(datetime.fromisoformat(v["start_time"]) for v in vs)
                  for u, vs in by_user.items()}
    all_in = max(created.values())
    begin = min((end for end in (datetime.fromisoformat(v["end_time"]) for v in views.values())
                 if end >= all_in), default=all_in)
    return begin, min(last_start.values())


def start_shares(views: dict[str, dict[str, Any]], owner: dict[str, str]
                 ) -> tuple[dict[str, float], int]:
    """Each user's share of the starts made in the judged window, and how many starts that was."""
    begin, end = judged_window(views, owner)
    counts = Counter(owner[job_id] for job_id, view in views.items()
                     if begin <= datetime.fromisoformat(view["start_time"]) < end)
    total = sum(counts.values())
    return {user: counts[user] / (total or 1) for user in sorted(set(owner.values()))}, total


def slot_shares(views: dict[str, dict[str, Any]], owner: dict[str, str]) -> dict[str, float]:
    """Each user's share of the slot time (jobs running) in the judged window.

    This is what the claim order decides: who holds the slots. Starts alone over-count a user
    whose jobs are shorter (with the environment cache, the first user's jobs hit the cache on
    every host while the others' first job per host still installs).
    """
    begin, end = judged_window(views, owner)
    held: dict[str, float] = defaultdict(float)
    for job_id, view in views.items():
        start = max(datetime.fromisoformat(view["start_time"]), begin)
        stop = min(datetime.fromisoformat(view["end_time"]), end)
        if stop > start:
            held[owner[job_id]] += (stop - start).total_seconds()
    total = sum(held.values())
    return {user: held[user] / (total or 1) for user in sorted(set(owner.values()))}


def run_backend(backend: str, hosts: list[str], image: str, ca_bundle: str, jobs: int,
                replicas: int, users: int, concurrency: int) -> Result:
    workdir = Path(tempfile.mkdtemp(prefix=f"ci-bench-hosts-{backend}-"))
    statuses = Statuses()
    failures: list[str] = []
    try:
        with database(backend) as url:
            dep = Deployment(workdir=workdir, runner_image=image, ca_bundle=ca_bundle,
                             database_url=url)
            try:
                servers = [dep.start_server() for _ in range(replicas)]
                urls = [str(server.url) for server in servers]
                for n, host in enumerate(hosts, 1):
                    dep.start_controller(DOCKER_HOST=host,
                                         CI_CONTROLLER_ID=f"host{n}-{dep.run_id}",
                                         CI_MAX_CONCURRENT_JOBS=str(concurrency))
                people = [dep.create_user(f"user{n}-{dep.run_id}@example.com")
                          for n in range(users)]
                clients = {user.email: statuses.client(user) for user in people}
                watch = EngineStarts(hosts, dep.label())
                try:
                    result = load(dep, workdir, urls, people, clients, watch, jobs, failures)
                finally:
                    watch.close()
                for server in servers:
                    log = server.log()
                    if "ERROR" in log or "Traceback" in log:
                        failures.append(f"a replica logged an error:\n{log[-2000:]}")
            finally:
                dep.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    bad = {status: count for status, count in statuses.seen.items() if status >= 500}
    if bad:
        failures.append(f"5xx answers: {bad}")
    submit_ms, line_ms, wall_s, shares, spread, window = result
    return Result(backend, jobs, wall_s, jobs / wall_s * 60, submit_ms, line_ms, shares,
                  spread, window, failures)


def load(dep: Deployment, workdir: Path, urls: list[str], people: list[User],
         clients: dict[str, httpx.Client], watch: EngineStarts, jobs: int,
         failures: list[str]) -> tuple[list[float], list[float], float, dict[str, float],
                                       dict[str, int], int]:
    burst, later = submissions(jobs, len(people))
    plan = [(people[0], n) for n in range(burst)]
    archives = [zip_project(tagged_project(workdir / f"job-{n}", f"job-{n}", LINES, 0.1))
                for n in range(jobs)]
    owner: dict[str, str] = {}
    tag_of: dict[str, str] = {}
    live: dict[str, LiveLog] = {}
    submit_ms: list[float] = []
    lock = threading.Lock()

    def post(user: User, n: int) -> None:
        client, url = clients[user.email], urls[n % len(urls)]
        started = time.perf_counter()
        response = client.post(f"{url}/jobs", files={"archive": ("p.zip", archives[n])})
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code != 201:
            raise RuntimeError(f"POST /jobs answered {response.status_code}: {response.text}")
        job_id = response.json()["id"]
        follow = LiveLog(client, urls[(n + 1) % len(urls)], job_id, f"job-{n}")
        with lock:
            submit_ms.append(elapsed)
            owner[job_id], tag_of[job_id], live[job_id] = user.email, f"job-{n}", follow

    # The later users' jobs interleaved, as if each submitted on their own at the same time.
    rest: list[tuple[User, int]] = []
    for turn in range(max(later)):
        rest += [(user, 0) for user, count in zip(people[1:], later, strict=True)
                 if turn < count]
    rest = [(user, burst + i) for i, (user, _) in enumerate(rest)]

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda job: post(*job), plan))
    with ThreadPoolExecutor(max_workers=3 * (len(people) - 1)) as pool:
        list(pool.map(lambda job: post(*job), rest))
    print(f"  {dep.backend}: {jobs} jobs submitted in {time.time() - t0:.1f} s", flush=True)

    views: dict[str, dict[str, Any]] = {}
    for user in people:
        mine = {job_id for job_id, who in owner.items() if who == user.email}
        views.update(wait_terminal(clients[user.email], urls[0], mine, RUN_DEADLINE_S))
    wall_s = max(datetime.fromisoformat(v["end_time"]).timestamp() for v in views.values()) - t0
    time.sleep(1.0)  # the last start events are in flight

    not_passed = {j: (v["status"], v["reason"]) for j, v in views.items()
                  if (v["status"], v["success"]) != ("completed", True)}
    for job_id, (status, reason) in list(not_passed.items())[:3]:
        text, _ = read_log(clients[owner[job_id]], urls[0], job_id)
        failures.append(f"job {job_id} {status}: {reason}; its output ends:\n{text[-1500:]}")
    if not_passed:
        failures.append(f"{len(not_passed)} jobs did not pass")
    starts = watch.per_job()
    wrong = {job_id: starts[job_id] for job_id in owner if starts[job_id] != 1}
    if wrong:
        failures.append(f"jobs not started exactly once: {wrong}")
    expected = list(range(1, LINES + 1))
    line_ms: list[float] = []
    for job_id, follow in live.items():
        follow.thread.join(60)
        line_ms += follow.latencies_ms
        if follow.error or not follow.kinds or follow.kinds[-1] != "end":
            failures.append(f"live stream of {job_id}: {follow.error or follow.kinds[-3:]}")
        elif lines_of(follow.tag, follow.text) != expected:
            failures.append(f"live log of {job_id} incomplete or out of order")

    def reread(job_id: str) -> bool:
        text, kinds = read_log(clients[owner[job_id]], urls[-1], job_id)
        return kinds[-1] == "end" and lines_of(tag_of[job_id], text) == expected

    with ThreadPoolExecutor(max_workers=6) as pool:
        rereads = dict(zip(owner, pool.map(reread, owner), strict=True))
    if not all(rereads.values()):
        failures.append(f"logs read afterwards incomplete: "
                        f"{[j for j, ok in rereads.items() if not ok][:5]}")

    shares, window = start_shares(views, owner)
    held = slot_shares(views, owner)
    print(f"  {dep.backend}: slot-time shares while all waited: "
          + " / ".join(f"{share:.2f}" for share in held.values()), flush=True)
    fair = 1 / len(people)
    unfair = {u: s for u, s in held.items()
              if not FAIR_BAND[0] * fair <= s <= FAIR_BAND[1] * fair}
    if window < MIN_WINDOW_STARTS:
        print(f"  {dep.backend}: only {window} starts while all users waited: too few to "
              f"judge fairness (a larger --jobs)")
    elif unfair:
        failures.append(f"unfair slot time over {window} starts (fair share {fair:.2f}): "
                        f"{unfair}")
    spread = {host.rsplit("/", 2)[-2]: count
              for host, count in watch.hosts_of(set(owner)).items()}
    return submit_ms, line_ms, wall_s, shares, spread, window


def report(results: list[Result], hosts: int, replicas: int, users: int,
           concurrency: int) -> None:
    print(f"\nseveral hosts: {hosts} engines × {concurrency} jobs at once, {replicas} replicas, "
          f"{users} users (one burst of 3/8 of the jobs, then the others together)")
    print("| Backend | Jobs | Wall | Jobs/min | Submit p50 / p95 | Line p50 / p95 | "
          "Start shares while all waited | Checks |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        shares = " / ".join(f"{share:.2f}" for share in r.shares.values())
        print(f"| {r.backend} | {r.jobs} | {r.wall_s:.0f} s | {r.jobs_per_min:.0f} | "
              f"{percentile(r.submit_ms, 0.5):.0f} / {percentile(r.submit_ms, 0.95):.0f} ms | "
              f"{percentile(r.line_ms, 0.5):.0f} / {percentile(r.line_ms, 0.95):.0f} ms | "
              f"{shares} | {'passed' if not r.failures else 'FAILED'} |")
    for r in results:
        print(f"{r.backend}: jobs per engine {r.spread}; {len(r.line_ms)} lines timed; "
              f"median submit {statistics.median(r.submit_ms):.0f} ms; fairness over "
              f"{r.window} starts")
        for failure in r.failures:
            print(f"  FAILED ({r.backend}): {failure}")


def run(jobs: int = 120, backends: tuple[str, ...] = ("postgres", "sqlite"), hosts: int = 3,
        replicas: int = 3, users: int = 4, concurrency: int = 2) -> bool:
    """Run the load on each backend, print the table; whether every check passed."""
    if users < 2:
        raise SystemExit("several_hosts: --users must be at least 2 (fairness needs two)")
    image = subprocess.run([str(REPO_ROOT / "scripts" / "ensure-docker")], check=True,
                           capture_output=True, text=True).stdout.strip().splitlines()[-1]
    ca_bundle = subprocess.run([str(REPO_ROOT / "scripts" / "host-ca-bundle")], check=True,
                               capture_output=True, text=True).stdout.strip()
    results = []
    with docker_engines(hosts, image) as engine_hosts:
        for backend in backends:
            print(f"several hosts: {backend}, {jobs} jobs", flush=True)
            results.append(run_backend(backend, engine_hosts, image, ca_bundle, jobs,
                                       replicas, users, concurrency))
    report(results, hosts, replicas, users, concurrency)
    return all(not r.failures for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=120)
    parser.add_argument("--backend", choices=("both", "sqlite", "postgres"), default="both")
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2,
                        help="CI_MAX_CONCURRENT_JOBS of each controller")
    args = parser.parse_args()
    backends = ("postgres", "sqlite") if args.backend == "both" else (args.backend,)
    ok = run(args.jobs, backends, args.hosts, args.replicas, args.users, args.concurrency)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
