"""The installed-environment cache's figures: `.venv/bin/python -m bench.run --env-cache`.

Each figure is submit → exit of `ci submit test` (median of --runs), beside a plain
`docker run … pip install -r requirements.txt && pytest` of the same project measured in the
same run, interleaved so drift hits both sides alike:

- unchanged requirements (a cache hit)            target ≤ 0.5 × the plain run
- fresh requirements (a miss: installs and caches) target ≤ 1.10 × the plain run
- 4 jobs at once, unchanged requirements           target ≤ 1.5 × one such job; 4 plain runs at
  once are measured too (the machine may have fewer cores than jobs)

Beside the times, the machine's CPU time (every core, every process: the `ci` clients, the
services, the engine, the containers, the kernel) spent per hit and per four hits. Four jobs on
`cores` cores cannot end sooner than 4 × (CPU per hit) / cores, however the work is arranged, so
the report prints that floor next to the four-at-once time: when the time sits on the floor,
the jobs ran side by side and only more cores (or less work per job) would bring it down.
(Other work on the machine counts too: the floor means something on a quiet machine only.)
The same four-at-once figure for jobs whose test waits SLEEP_S (CPU-light, as tests waiting on
I/O are) shows the side-by-side running itself, without the cores as the limit.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.summary import Figure
from tests.e2e.harness import Deployment, write_project

TEST = "import iniconfig\n\ndef test_ok():\n    assert iniconfig.IniConfig\n"
REQUIREMENTS = "pytest\niniconfig\n"
SLEEP_S = 2.0
SLEEPING_TEST = f"import time\n\ndef test_waits():\n    time.sleep({SLEEP_S})\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all cores have spent on anything but idling so far (Linux /proc/stat)."""
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(field) for field in Path("/proc/stat").read_text().split(maxsplit=9)[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def _busy(work: Callable[[], float]) -> tuple[float, float]:
    """`work`'s seconds and the machine CPU seconds spent meanwhile."""
    before = machine_busy_s()
    seconds = work()
    return seconds, machine_busy_s() - before


def _submit(dep: Deployment, project: Path, key: str) -> float:
    started = time.perf_counter()
    result = dep.ci("submit", "test", cwd=project, server=dep.processes[-1], api_key=key,
                    timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"bench job failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return time.perf_counter() - started


def _at_once(count: int, work: Callable[[], float]) -> float:
    """Seconds from starting `count` of work together until the last one ended."""
    started = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        list(pool.map(lambda _: work(), range(count)))
    return time.perf_counter() - started


def measure(dep: Deployment, key: str, workdir: Path, runs: int,
            docker_run: Callable[[Path], float]) -> dict[str, float]:
    """Medians, in seconds, of each figure (see the module docstring)."""
    project = write_project(workdir / "cached", {"test_ok.py": TEST}, REQUIREMENTS)
    _submit(dep, project, key)  # builds the entry the unchanged runs start from
    docker_run(project)  # warm-up: page cache, the proxy's cache
    hits, misses, plain, hit_cpu = [], [], [], []
    for _ in range(runs):
        seconds, cpu = _busy(lambda: _submit(dep, project, key))
        hits.append(seconds)
        hit_cpu.append(cpu)
        fresh = write_project(workdir / f"fresh-{uuid.uuid4().hex[:8]}", {"test_ok.py": TEST},
                              REQUIREMENTS + f"# {uuid.uuid4().hex}\n")
        misses.append(_submit(dep, fresh, key))
        plain.append(docker_run(project))
    fours = [_busy(lambda: _at_once(4, lambda: _submit(dep, project, key)))
             for _ in range(runs)]
    four_plain = [_at_once(4, lambda: docker_run(project)) for _ in range(max(runs // 2, 1))]
    # Same requirements, so the same cached environment: only the test differs.
    sleeper = write_project(workdir / "sleeping", {"test_waits.py": SLEEPING_TEST}, REQUIREMENTS)
    sleeps = [_submit(dep, sleeper, key) for _ in range(runs)]
    four_sleeps = [_at_once(4, lambda: _submit(dep, sleeper, key)) for _ in range(runs)]
    return {"hit": statistics.median(hits), "miss": statistics.median(misses),
            "plain": statistics.median(plain),
            "four_hits": statistics.median(seconds for seconds, _ in fours),
            "four_plain": statistics.median(four_plain),
            "hit_cpu": statistics.median(hit_cpu),
            "four_hits_cpu": statistics.median(cpu for _, cpu in fours),
            "sleep": statistics.median(sleeps), "four_sleeps": statistics.median(four_sleeps)}


def report(figures: dict[str, float], runs: int) -> None:
    hit, miss, plain = figures["hit"], figures["miss"], figures["plain"]
    print(f"environment cache, {runs} runs (medians), submit → exit:")
    print(f"  plain docker run (pip install + pytest):  {plain:6.2f} s")
    print(f"  unchanged requirements (cache hit):       {hit:6.2f} s   "
          f"{hit / plain:5.2f} × plain (target ≤ 0.5)")
    print(f"  fresh requirements (installs, caches):    {miss:6.2f} s   "
          f"{miss / plain:5.2f} × plain (target ≤ 1.10)")
    print(f"  4 jobs at once, unchanged:                {figures['four_hits']:6.2f} s   "
          f"{figures['four_hits'] / hit:5.2f} × one job (target ≤ 1.5)")
    print(f"  4 plain docker runs at once:              {figures['four_plain']:6.2f} s   "
          f"{figures['four_plain'] / plain:5.2f} × one plain run")
    print(f"  one job, test sleeping {SLEEP_S:.0f} s:               {figures['sleep']:6.2f} s")
    print(f"  4 such jobs at once:                      {figures['four_sleeps']:6.2f} s   "
          f"{figures['four_sleeps'] / figures['sleep']:5.2f} × one such job")
    cores = os.cpu_count() or 1
    floor = 4 * figures["hit_cpu"] / cores
    four_busy = figures["four_hits_cpu"] / (cores * figures["four_hits"])
    print(f"  machine CPU: {figures['hit_cpu']:.2f} CPU-s per hit alone; "
          f"{figures['four_hits_cpu']:.2f} CPU-s for 4 hits at once "
          f"({100 * four_busy:.0f} % of {cores} cores over those {figures['four_hits']:.2f} s)")
    print(f"  floor for 4 hits on {cores} cores, 4 × CPU per hit / cores: {floor:6.2f} s   "
          f"{floor / hit:5.2f} × one job; 1.5 × needs ≥ "
          f"{4 * figures['hit_cpu'] / (1.5 * hit):.1f} cores at this CPU per hit")


def targets(figures: dict[str, float]) -> list[Figure]:
    """The three cache figures issue #10 sets targets for."""
    hit, miss, plain, four = (figures["hit"], figures["miss"], figures["plain"],
                              figures["four_hits"])
    return [
        Figure("cache hit, submit → exit", f"{hit:.2f} s ({hit / plain:.2f} × plain run)",
               "≤ 0.5 × plain docker run", hit / plain <= 0.5),
        Figure("fresh requirements, submit → exit",
               f"{miss:.2f} s ({miss / plain:.2f} × plain run)", "≤ 1.10 × plain docker run",
               miss / plain <= 1.10),
        Figure("4 cache hits at once", f"{four:.2f} s ({four / hit:.2f} × one hit)",
               "≤ 1.5 × one hit", four / hit <= 1.5),
    ]
