"""What an idle deployment costs (issue #9/#10); prints numbers, asserts nothing.

    .venv/bin/python bench/idle.py [--seconds 20] [--history 10000] [--backend sqlite|postgres]

For each backend (SQLite file; PostgreSQL on a throwaway server), with an empty history and then
with `--history` finished jobs (each with a few output lines) in the database:
- CPU of one idle server replica and one idle controller, in % of one core, from the
  process's utime+stime in /proc over `--seconds` (after a settling pause);
- `GET /jobs?limit=50` (what `ci list` asks) seen from the client: median of 20 requests;
- `ci list` start to exit (the console script): median of 5.
Targets: each idle process under 0.5 % of a core; history changes neither figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.backends import database  # noqa: E402
from bench.summary import Figure  # noqa: E402
from ci_common.models import (  # noqa: E402
    Fence,
    JobOutcome,
    JobStatus,
    OutputChunk,
    OutputStream,
    utcnow,
)
from tests.e2e.harness import Deployment, Process  # noqa: E402

CI = Path(sys.executable).with_name("ci")
SETTLE_S = 3.0
IDLE_TARGET_PERCENT = 0.5
LIST_RUNS = 15  # `ci list` is ~0.1 s: one stray 50 ms stall must not move the median
CLK_TCK = os.sysconf("SC_CLK_TCK")
SEED_CONTROLLER = "bench-seeder"
PASSED = JobOutcome(status=JobStatus.COMPLETED, exit_code=0, success=True, reason=None)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_percent(processes: list[Process], seconds: float) -> list[float]:
    """% of one core each process used over the next `seconds`."""
    before = [cpu_seconds(p.popen.pid) for p in processes]
    started = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - started
    return [100 * (cpu_seconds(p.popen.pid) - b) / wall for p, b in zip(processes, before,
                                                                          strict=True)]


def seed_history(dep: Deployment, email: str, count: int) -> None:
    """`count` finished jobs of the user, each with 5 output lines, written as a controller
    would (claim, run, output, finish) under a lease of its own."""
    from tests.leases import hold_lease

    repo = dep.open_repository()
    try:
        user = repo.get_user_by_email(email)
        fence: Fence = hold_lease(repo, SEED_CONTROLLER)
        lines = [OutputChunk(OutputStream.STDOUT, f"line {i}\n") for i in range(5)]
        for _ in range(count):
            job = repo.create_job(user.id, b"PK\x05\x06" + b"\0" * 18, None)
            claimed = repo.claim_next_job(fence)
            assert claimed is not None and claimed.id == job.id
            repo.mark_running(job.id, "c", utcnow(), fence=fence)
            repo.append_output(job.id, lines, 1, fence=fence)
            repo.finish_job(job.id, PASSED, utcnow(), fence=fence)
    finally:
        repo.close()


def list_times(server: Process, key: str) -> tuple[float, float]:
    """(median ms of GET /jobs?limit=50, median s of `ci list`)."""
    assert server.url is not None
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as http:
        http.get("/jobs", params={"limit": 50}).raise_for_status()
        api = []
        for _ in range(20):
            started = time.perf_counter()
            http.get("/jobs", params={"limit": 50}).raise_for_status()
            api.append((time.perf_counter() - started) * 1000)
    cli = []
    for _ in range(LIST_RUNS):
        started = time.perf_counter()
        subprocess.run([str(CI), "list", "--server", server.url, "--api-key", key],
                       capture_output=True, check=True, timeout=60)
        cli.append(time.perf_counter() - started)
    return statistics.median(api), statistics.median(cli)


@dataclass(frozen=True)
class IdleRow:
    """One deployment's idle figures."""

    backend: str
    history: int  # finished jobs in the database
    replica_percent: float  # of one core
    controller_percent: float
    api_ms: float  # GET /jobs?limit=50, median
    cli_s: float  # `ci list`, median

    def __str__(self) -> str:
        return (f"{self.backend:8} {self.history:>7} jobs: replica {self.replica_percent:5.2f} %, "
                f"controller {self.controller_percent:5.2f} % of a core; "
                f"GET /jobs {self.api_ms:5.1f} ms, ci list {self.cli_s:5.3f} s")


def measure(backend: str, seconds: float, history: int, image: str) -> list[IdleRow]:
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="ci-bench-idle-"))
    try:
        with database(backend) as url:
            dep = Deployment(workdir=workdir, runner_image=image, ca_bundle=None,
                             database_url=url,
                             extra_env={"CI_RECONCILE_INTERVAL": "2.0"})  # the default
            try:
                email = "bench@example.com"
                key = dep.create_user(email).api_key
                for jobs in (0, history):
                    if jobs:
                        for process in dep.processes:
                            process.terminate()
                        dep.processes.clear()
                        started = time.monotonic()
                        seed_history(dep, email, jobs)
                        print(f"  {backend}: seeded {jobs} finished jobs in "
                              f"{time.monotonic() - started:.0f} s", flush=True)
                    controller = dep.start_controller()
                    server = dep.start_server()
                    time.sleep(SETTLE_S)
                    server_cpu, controller_cpu = cpu_percent([server, controller], seconds)
                    api_ms, cli_s = list_times(server, key)
                    rows.append(IdleRow(backend, jobs, server_cpu, controller_cpu, api_ms, cli_s))
                    print(f"  {rows[-1]}", flush=True)
            finally:
                dep.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def run(seconds: float, history: int, backends: list[str]) -> list[IdleRow]:
    """Every measurement; returns the report lines."""
    image = os.environ.get("CI_RUNNER_IMAGE") or subprocess.run(
        [str(REPO_ROOT / "scripts" / "ensure-docker")], check=True, capture_output=True,
        text=True).stdout.strip().splitlines()[-1]
    rows = []
    for backend in backends:
        rows += measure(backend, seconds, history, image)
    return rows


def report(rows: list[IdleRow], seconds: float) -> None:
    print(f"idle cost over {seconds:.0f} s (targets: each < 0.5 % of a core; history changes "
          "neither CPU nor list time):")
    for row in rows:
        print(f"  {row}")


LIST_NOISE = 1.25  # `ci list` with a long history may take this much of the empty time (noise)


def figures(rows: list[IdleRow]) -> list[Figure]:
    """Idle CPU of each service per row; `ci list` with the history against without."""
    found = []
    for row in rows:
        where = f"{row.backend}, {row.history:,} jobs"
        found += [Figure(f"idle replica, {where}", f"{row.replica_percent:.2f} % of a core",
                         f"< {IDLE_TARGET_PERCENT} %", row.replica_percent < IDLE_TARGET_PERCENT),
                  Figure(f"idle controller, {where}",
                         f"{row.controller_percent:.2f} % of a core", f"< {IDLE_TARGET_PERCENT} %",
                         row.controller_percent < IDLE_TARGET_PERCENT)]
    for empty in (row for row in rows if row.history == 0):
        for full in (row for row in rows if row.backend == empty.backend and row.history):
            found.append(Figure(f"ci list, {full.backend}, {full.history:,} jobs vs none",
                                f"{full.cli_s:.3f} s vs {empty.cli_s:.3f} s",
                                f"≤ {LIST_NOISE} × (unchanged)",
                                full.cli_s <= LIST_NOISE * empty.cli_s))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--history", type=int, default=10_000)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], action="append")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on `timeout` too
    report(run(args.seconds, args.history, args.backend or ["sqlite", "postgres"]),
           args.seconds)


if __name__ == "__main__":
    main()
