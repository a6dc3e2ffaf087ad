"""Many SSE watchers of one job on one replica (issue #9/#10); prints numbers and the check.

    .venv/bin/python bench/watchers.py [--watchers 1000] [--lines 1000] [--backend sqlite]

A real deployment (controller, one server replica, Docker) runs a test that prints `--lines`
numbered, time-stamped lines, 100 a second. Half the watchers connect before it starts
(`since=start`), the other half join once a third of the lines are out (`since=now`). Each
watcher is a bare asyncio socket (the client must not be what is measured) that records every
event's id, kind and text. Checked, for every watcher: the events it got are exactly the job's
stored events after its starting point, in order, each once, ending with `end`.
Measured: the replica's CPU (utime+stime from /proc) from the first connection to the last
stream's end, in % of one core (target ≤ 25 %), and line latency from the container's print to
its arrival at the watchers (p50 and max over all watchers and lines).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.idle import cpu_seconds  # noqa: E402
from bench.summary import Figure  # noqa: E402
from tests.e2e.harness import Deployment, submit_async, write_project  # noqa: E402
from tests.e2e.sse_watchers import Watcher, problems, reference_events, watch  # noqa: E402

TARGET_PERCENT = 25
TIMED_WATCHERS = 20  # of each half: arrival times kept for line latency

LINES_TEST = (
    "import time\n"
    "def test_lines():\n"
    "    for i in range({count}):\n"
    "        print(f'line {{i:06d}} {{time.time():.6f}}', flush=True)\n"
    "        time.sleep(0.01)\n"
)


async def run_watchers(dep: Deployment, server_url: str, server_pid: int, key: str,
                       project: Path, count: int, lines: int
                       ) -> tuple[list[Watcher], float, float, str]:
    """Connect half, submit, connect the other half mid-job; (watchers, cpu %, seconds, job)."""
    job_id = await asyncio.to_thread(submit_async, dep, server_url, project, key)
    early = [Watcher("start", timed=i < TIMED_WATCHERS) for i in range(count // 2)]
    late = [Watcher("now", timed=i < TIMED_WATCHERS) for i in range(count - len(early))]
    cpu_before, started = cpu_seconds(server_pid), time.monotonic()
    tasks = [asyncio.create_task(watch(server_url, key, job_id, w)) for w in early]
    for watcher in early:
        await watcher.live.wait()
    third = f"line {lines // 3:06d}"
    while not any(third.encode() in chunk for _, chunk in early[0].raw) and not tasks[0].done():
        await asyncio.sleep(0.01)
    tasks += [asyncio.create_task(watch(server_url, key, job_id, w)) for w in late]
    await asyncio.gather(*tasks)
    seconds = time.monotonic() - started
    cpu = 100 * (cpu_seconds(server_pid) - cpu_before) / seconds
    return early + late, cpu, seconds, job_id


async def _reference(url: str, key: str, job_id: str) -> list[tuple[int, str, str]]:
    return await reference_events(url, key, job_id)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


@dataclass(frozen=True)
class WatchersResult:
    """What one run measured: its report lines and its headline figures."""

    backend: str
    rows: list[str]
    cpu_percent: float  # of one core, over the job
    all_in_order: bool  # every watcher got every event once, in order


def run(count: int, lines: int, backend: str) -> WatchersResult:
    """The whole measurement."""
    from bench.backends import database

    image = os.environ.get("CI_RUNNER_IMAGE") or subprocess.run(
        [str(REPO_ROOT / "scripts" / "ensure-docker")], check=True, capture_output=True,
        text=True).stdout.strip().splitlines()[-1]
    ca_bundle = subprocess.run([str(REPO_ROOT / "scripts" / "host-ca-bundle")], check=True,
                               capture_output=True, text=True).stdout.strip() or None
    workdir = Path(tempfile.mkdtemp(prefix="ci-bench-watchers-"))
    try:
        with database(backend) as url:
            dep = Deployment(workdir=workdir, runner_image=image, ca_bundle=ca_bundle,
                             database_url=url)
            try:
                dep.start_controller()
                server = dep.start_server()
                assert server.url is not None
                key = dep.create_user("bench@example.com").api_key
                project = write_project(workdir / "lines",
                                        {"test_lines.py": LINES_TEST.format(count=lines)},
                                        capture=False)
                watchers, cpu, seconds, job_id = asyncio.run(run_watchers(
                    dep, server.url, server.popen.pid, key, project, count, lines))
                found = problems(watchers, asyncio.run(_reference(server.url, key, job_id)))
            finally:
                dep.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    latencies = [ms for watcher in watchers if watcher.timed for ms in watcher.latencies_ms()]
    rows = [f"{backend}: {count} watchers ({count // 2} from the start, {count - count // 2} "
            f"joining mid-job) of one job printing {lines} lines over {seconds:.1f} s",
            f"  every watcher got every event once, in order: "
            f"{'yes' if not found else f'NO, {len(found)} did not'}",
            f"  replica CPU over the job: {cpu:.1f} % of a core, {cpu * seconds / 100:.1f} CPU-s "
            f"(target ≤ {TARGET_PERCENT} %)"]
    if latencies:
        rows.append(f"  line latency print → {2 * TIMED_WATCHERS} of the watchers "
                    f"({len(latencies)} deliveries): "
                    f"p50 {percentile(latencies, 0.5):.1f} ms, p95 "
                    f"{percentile(latencies, 0.95):.1f} ms, max {max(latencies):.1f} ms")
    rows += [f"  {problem}" for problem in found[:10]]
    return WatchersResult(backend, rows, cpu, not found)


def figures(result: WatchersResult) -> list[Figure]:
    return [Figure(f"1,000 watchers, replica CPU, {result.backend}",
                   f"{result.cpu_percent:.1f} % of a core",
                   f"≤ {TARGET_PERCENT} %", result.cpu_percent <= TARGET_PERCENT),
            Figure(f"1,000 watchers, every line once and in order, {result.backend}",
                   "yes" if result.all_in_order else "no", "yes", result.all_in_order)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on `timeout` too
    for row in run(args.watchers, args.lines, args.backend).rows:
        print(row)


if __name__ == "__main__":
    main()
