"""The installed-environment cache's figures: `.venv/bin/python -m bench.run --env-cache`.

Each figure is submit → exit of `ci submit test` (median of --runs), beside a plain
`docker run … pip install -r requirements.txt && pytest` of the same project measured in the
same run, interleaved so drift hits both sides alike:

- unchanged requirements (a cache hit)            target ≤ 0.5 × the plain run
- fresh requirements (a miss: installs and caches) target ≤ 1.10 × the plain run
- 4 jobs at once, unchanged requirements           target ≤ 1.5 × one such job; 4 plain runs at
  once are measured too (the machine may have fewer cores than jobs)
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.e2e.harness import Deployment, write_project

TEST = "import iniconfig\n\ndef test_ok():\n    assert iniconfig.IniConfig\n"
REQUIREMENTS = "pytest\niniconfig\n"


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
    hits, misses, plain = [], [], []
    for _ in range(runs):
        hits.append(_submit(dep, project, key))
        fresh = write_project(workdir / f"fresh-{uuid.uuid4().hex[:8]}", {"test_ok.py": TEST},
                              REQUIREMENTS + f"# {uuid.uuid4().hex}\n")
        misses.append(_submit(dep, fresh, key))
        plain.append(docker_run(project))
    four_hits = [_at_once(4, lambda: _submit(dep, project, key)) for _ in range(runs)]
    four_plain = [_at_once(4, lambda: docker_run(project)) for _ in range(max(runs // 2, 1))]
    return {"hit": statistics.median(hits), "miss": statistics.median(misses),
            "plain": statistics.median(plain), "four_hits": statistics.median(four_hits),
            "four_plain": statistics.median(four_plain)}


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
