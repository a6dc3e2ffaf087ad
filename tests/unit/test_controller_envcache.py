"""The installed-environment cache: its decisions (envcache.py), its store (envstore.py) over the
in-memory repository and the fake runtime, and a controller running jobs through it."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from ci_common.models import EnvEntry, EnvKey, EnvState, Job, JobStatus, utcnow
from ci_common.settings import Settings
from ci_controller.envcache import (
    ENV_DIR,
    MISS_NOTE,
    EnvMode,
    EnvPlan,
    age_text,
    env_report,
    hit_note,
    plan_eviction,
    requirements_sha256,
)
from ci_controller.envstore import EnvStore
from ci_controller.fake_runtime import FakeRuntime, FakeScript, runner_frames
from ci_controller.metrics import ControllerMetrics
from ci_controller.reconciler import Controller
from ci_controller.runner_entry import ENV_MARKER, env_problem, tree_size
from ci_controller.spec import job_container_spec
from ci_persistence.memory import InMemoryRepository
from tests.leases import hold_lease

MB = 1024 * 1024


def project_zip(requirements: bytes = b"pytest\n", *extra: tuple[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("requirements.txt", requirements)
        zf.writestr("tests/test_a.py", "def test_a(): pass\n")
        for name, data in extra:
            zf.writestr(name, data)
    return buffer.getvalue()


def settings(**overrides: object) -> Settings:
    base = Settings(controller_id="ctl-1", container_prefix="t_", runner_image="img:test",
                    reconcile_interval_s=0.0, cancel_grace_s=0.2)
    return replace(base, **overrides)  # type: ignore[arg-type]


def exported(metrics: ControllerMetrics, name: str) -> float | None:
    """A sample as Prometheus scrapes it."""
    return metrics.registry.get_sample_value(name)


def entry(volume: str, size: int, state: EnvState = EnvState.READY,
          used_s_ago: float = 0.0) -> EnvEntry:
    now = utcnow()
    return EnvEntry(id=volume, key=EnvKey("u", "e", "i", volume), volume=volume, state=state,
                    job_id="j", python_version="3.11.2", size_bytes=size, created_at=now,
                    built_at=now, last_used_at=now - timedelta(seconds=used_s_ago))


# ----------------------------------------------------------------------------- decisions
def test_requirements_hash_is_of_the_file_the_runner_unpacks_last() -> None:
    import hashlib

    assert requirements_sha256(project_zip(b"six\n")) == hashlib.sha256(b"six\n").hexdigest()
    twice = project_zip(b"six\n", ("./requirements.txt", b"iniconfig\n"))
    assert requirements_sha256(twice) == hashlib.sha256(b"iniconfig\n").hexdigest()
    assert requirements_sha256(b"not a zip") is None
    assert requirements_sha256(project_zip(b"x" * (MB + 1))) is None
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("sub/requirements.txt", "six\n")
    assert requirements_sha256(buffer.getvalue()) is None


def test_notes_say_how_old_and_how_large() -> None:
    assert [age_text(s) for s in (5, 125, 3 * 3600 + 5, 2 * 86400)] == [
        "5 s", "2 min", "3 h", "2 d"]
    built = entry("v", 48 * MB, used_s_ago=0)
    later = replace(built, built_at=utcnow() - timedelta(hours=3, minutes=2))
    assert hit_note(later, utcnow()) == "using cached environment (built 3 h ago, 48.0 MB)"


def test_env_report_reads_phases_before_the_tests_only() -> None:
    built = 'env built {"id": "e1", "python": "3.11.2", "size": 123}'
    report = env_report(["install started", built, "tests started",
                         'env built {"id": "e1", "python": "3.11.2", "size": 0}'])
    assert (report.built_id, report.python_version, report.size_bytes) == ("e1", "3.11.2", 123)
    forged = env_report(["install started", "tests started", built])
    assert forged.built_id is None
    broken = env_report(["env broken e2: it is missing or was never completed"])
    assert (broken.broken_id, broken.broken_reason) == ("e2", "it is missing or was never "
                                                        "completed")
    assert env_report(["env used e3"]).used_id == "e3"
    assert env_report(["env built {not json"]).built_id is None


def test_eviction_is_least_recently_used_first_and_spares_volumes_in_use() -> None:
    entries = [entry("old", 40 * MB, used_s_ago=300), entry("mid", 40 * MB, used_s_ago=200),
               entry("new", 40 * MB, used_s_ago=100), entry("b", 90 * MB, EnvState.BUILDING)]
    assert plan_eviction(entries, 120 * MB, set()) == []
    assert [e.volume for e in plan_eviction(entries, 100 * MB, set())] == ["old"]
    assert [e.volume for e in plan_eviction(entries, 50 * MB, {"old"})] == ["mid", "new"]
    assert [e.volume for e in plan_eviction(entries, 0, set())] == ["old", "mid", "new"]


def test_container_spec_mounts_the_volume_writable_to_build_read_only_to_use() -> None:
    cfg = settings()
    built = entry("vol-1", MB)
    for mode, read_only in ((EnvMode.BUILD, False), (EnvMode.USE, True)):
        spec = job_container_spec(cfg, "job", "inst", env=EnvPlan(mode, built, "note"),
                                  requirements_sha256="abc")
        [mount] = [m for m in spec.mounts if m.target == ENV_DIR]
        assert (mount.source, mount.volume, mount.read_only) == ("vol-1", True, read_only)
        assert spec.command[-10:] == ("--env-mode", mode.value, "--env-dir", ENV_DIR,
                                      "--env-id", "vol-1", "--env-sha256", "abc",
                                      "--env-note", "note")
        assert spec.cap_drop == ("ALL",) and spec.security_opt == ("no-new-privileges",)
    plain = job_container_spec(cfg, "job", "inst")
    assert "--env-mode" not in plain.command and not any(m.volume for m in plain.mounts)


def test_runner_checks_the_marker_requirements_and_interpreter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    assert env_problem(str(env), "abc") == "it is missing or was never completed"
    (env / ENV_MARKER).write_text(json.dumps({"requirements_sha256": "abc",
                                              "python": platform.python_version()}))
    assert env_problem(str(env), "other") == "it was built from another requirements.txt"
    assert env_problem(str(env), "abc") == "its interpreter is missing"
    python = env / "bin" / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    assert env_problem(str(env), "abc") is None  # pytest: where this test runs from
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    site = env / "lib" / version / "site-packages" / "pytest"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert env_problem(str(env), "abc") is None
    (site / "__init__.py").unlink()
    assert env_problem(str(env), "abc") == "pytest is missing from it"
    monkeypatch.undo()
    (env / ENV_MARKER).write_text(json.dumps({"requirements_sha256": "abc", "python": "2.7"}))
    assert env_problem(str(env), "abc") == "it was built with Python 2.7"
    assert tree_size(str(env)) == len("#!/bin/sh\n") + (env / ENV_MARKER).stat().st_size


# ----------------------------------------------------------------------------- the store
@pytest.fixture
def repo() -> InMemoryRepository:
    return InMemoryRepository()


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


def new_job(repo: InMemoryRepository, email: str = "a@example.com", no_cache: bool = False,
            archive: bytes | None = None) -> Job:
    try:
        user = repo.get_user_by_email(email)
    except Exception:
        user = repo.create_user(email.split("@")[0], email)
    return repo.create_job(user.id, archive or project_zip(), None, no_cache=no_cache)


def built_phases(plan: EnvPlan, size: int = 10 * MB) -> list[str]:
    assert plan.entry is not None
    return ["install started", 'env built ' + json.dumps(
        {"id": plan.entry.id, "python": "3.11.2", "size": size}), "tests started",
        "tests exited 0"]


def test_a_successful_build_is_used_by_the_same_key_only(repo: InMemoryRepository,
                                                         runtime: FakeRuntime) -> None:
    metrics = ControllerMetrics()
    store = EnvStore(settings(), repo, runtime, "inst", metrics)
    sha = requirements_sha256(project_zip())
    job = new_job(repo)
    plan = store.prepare(job, sha)
    assert plan.mode is EnvMode.BUILD and plan.note == MISS_NOTE and plan.entry is not None
    assert runtime.volumes[plan.entry.volume] == {"ci.env_cache": "1", "ci.installation_id":
                                                  "inst", "ci.controller_id": "ctl-1"}
    assert store.in_use() == {plan.entry.volume}
    store.settle(job, plan, built_phases(plan))
    assert store.in_use() == set()
    [ready] = repo.list_envs()
    assert (ready.state, ready.size_bytes, ready.python_version) == (EnvState.READY, 10 * MB,
                                                                     "3.11.2")
    hit = store.prepare(new_job(repo), sha)
    assert hit.mode is EnvMode.USE and hit.entry is not None and hit.entry.id == ready.id
    assert hit.note.startswith("using cached environment (built ")
    assert store.prepare(new_job(repo, "b@example.com"), sha).mode is EnvMode.BUILD  # isolation
    assert store.prepare(new_job(repo), "f" * 64).mode is EnvMode.BUILD  # other requirements
    runtime.images["img:test"] = "sha256:rebuilt"
    assert store.prepare(new_job(repo), sha).mode is EnvMode.BUILD  # another image id
    assert store.prepare(new_job(repo, no_cache=True), sha).mode is EnvMode.BUILD
    assert (exported(metrics, "ci_env_cache_hits_total"),
            exported(metrics, "ci_env_cache_misses_total")) == (1, 5)


def test_failed_or_cut_short_builds_are_never_cached_and_their_volumes_go(
        repo: InMemoryRepository, runtime: FakeRuntime) -> None:
    store = EnvStore(settings(), repo, runtime, "inst")
    sha = requirements_sha256(project_zip())
    job = new_job(repo)
    plan = store.prepare(job, sha)
    assert plan.entry is not None
    store.settle(job, plan, ["install started", "install failed (exit 1)"])
    assert [e.state for e in repo.list_envs()] == [EnvState.REMOVING]
    store.maintain(set())
    assert repo.list_envs() == [] and runtime.volumes == {}
    assert store.prepare(new_job(repo), sha).mode is EnvMode.BUILD


def test_broken_or_vanished_entries_are_rebuilt(repo: InMemoryRepository,
                                                runtime: FakeRuntime) -> None:
    store = EnvStore(settings(), repo, runtime, "inst")
    sha = requirements_sha256(project_zip())
    job = new_job(repo)
    plan = store.prepare(job, sha)
    store.settle(job, plan, built_phases(plan))
    used_job = new_job(repo)
    used = store.prepare(used_job, sha)
    assert used.mode is EnvMode.USE and used.entry is not None
    store.settle(used_job, used, [f"env broken {used.entry.id}: it is missing or was never "
                                  "completed", "tests started", "tests exited 0"])
    assert repo.find_env(used.entry.key) is None  # the next job rebuilds
    store.maintain(set())
    assert runtime.volumes == {}
    job = new_job(repo)
    plan = store.prepare(job, sha)
    store.settle(job, plan, built_phases(plan))
    assert plan.entry is not None
    del runtime.volumes[plan.entry.volume]  # `docker volume rm` behind our back
    assert store.prepare(new_job(repo), sha).mode is EnvMode.BUILD
    assert repo.find_env(plan.entry.key) is None


def test_upkeep_evicts_lru_keeps_volumes_in_use_and_clears_leftovers(
        repo: InMemoryRepository, runtime: FakeRuntime) -> None:
    store = EnvStore(settings(env_cache_bytes=25 * MB), repo, runtime, "inst")
    plans = []
    for number in range(3):
        job = new_job(repo)
        plan = store.prepare(job, str(number) * 64)
        store.settle(job, plan, built_phases(plan))
        plans.append(plan)
    holding = store.prepare(new_job(repo), "0" * 64)  # the oldest is in use now
    assert holding.mode is EnvMode.USE
    runtime.create_volume("t_env_leftover", {"ci.env_cache": "1",
                                             "ci.installation_id": "inst"})
    key = replace(holding.entry.key, requirements_sha256="9" * 64)  # type: ignore[union-attr]
    repo.begin_env(key, "t_env_dead", "no-such-job", utcnow())  # a build whose job is gone
    runtime.create_volume("t_env_dead", {"ci.env_cache": "1", "ci.installation_id": "inst"})
    elsewhere = store.prepare(new_job(repo), "8" * 64)  # as if another controller's live build
    store.release(elsewhere)
    store.maintain(live_job_ids=set())
    left = {e.volume: e.state for e in repo.list_envs()}
    assert plans[0].entry is not None and plans[2].entry is not None
    assert elsewhere.entry is not None
    assert left == {plans[0].entry.volume: EnvState.READY, plans[2].entry.volume: EnvState.READY,
                    elsewhere.entry.volume: EnvState.BUILDING}
    assert set(runtime.volumes) == set(left)
    repo.retire_envs([elsewhere.entry.id])
    repo.prune_envs()  # `ci-admin cache prune`: the volume in use stays until its job ends
    store.maintain(live_job_ids=set())
    assert set(runtime.volumes) == {e.volume for e in repo.list_envs()} == {
        plans[0].entry.volume}
    store.release(holding)
    store.maintain(live_job_ids=set())
    assert repo.list_envs() == [] and runtime.volumes == {}


def test_a_store_with_no_budget_is_off(repo: InMemoryRepository, runtime: FakeRuntime) -> None:
    store = EnvStore(settings(env_cache_bytes=0), repo, runtime, "inst")
    assert store.prepare(new_job(repo), "a" * 64).mode is EnvMode.NONE
    assert store.prepare(new_job(repo), None).mode is EnvMode.NONE
    assert runtime.volumes == {}


# ----------------------------------------------------------------------------- the controller
@pytest.fixture
def controllers() -> Iterator[list[Controller]]:
    made: list[Controller] = []
    yield made
    for controller in made:
        controller.detach()


def test_controller_builds_then_starts_from_the_cache(repo: InMemoryRepository,
                                                     controllers: list[Controller]) -> None:
    def script(spec):  # type: ignore[no-untyped-def]
        command = list(spec.command)
        mode = command[command.index("--env-mode") + 1]
        env_id = command[command.index("--env-id") + 1]
        env = ("phase", "env built " + json.dumps({"id": env_id, "python": "3.11.2",
                                                   "size": 5 * MB}))
        if mode == "use":
            env = ("phase", f"env used {env_id}")
        return FakeScript(steps=runner_frames(("phase", "install started"), env,
                                              ("phase", "tests started"),
                                              ("phase", "tests exited 0")))

    runtime = FakeRuntime(script_for=script)
    cfg = settings()
    controller = Controller(cfg, repo, runtime, fence=hold_lease(repo, cfg.controller_id))
    controllers.append(controller)
    modes = []
    for _ in range(2):
        job = new_job(repo)
        assert controller.run_once()
        assert controller.join(10)
        assert repo.get_job(job.id).status is JobStatus.COMPLETED
        container = runtime.containers.get(repo.get_job(job.id).container_id or "")
        assert container is None  # removed
        modes.append(repo.list_envs())
    assert [e.state for e in modes[0]] == [EnvState.READY]
    assert modes[1] == [replace(modes[0][0], last_used_at=modes[1][0].last_used_at)]
    assert exported(controller.metrics, "ci_env_cache_hits_total") == 1
    assert exported(controller.metrics, "ci_env_cache_misses_total") == 1


def test_two_first_jobs_of_one_key_build_twice_harmlessly(repo: InMemoryRepository,
                                                          runtime: FakeRuntime) -> None:
    store = EnvStore(settings(), repo, runtime, "inst")
    sha = requirements_sha256(project_zip())
    jobs = [new_job(repo), new_job(repo)]
    plans = [store.prepare(job, sha) for job in jobs]
    assert [p.mode for p in plans] == [EnvMode.BUILD, EnvMode.BUILD]
    assert plans[0].entry is not None and plans[1].entry is not None
    assert plans[0].entry.volume != plans[1].entry.volume
    for job, plan in zip(jobs, plans, strict=True):
        store.settle(job, plan, built_phases(plan))
    store.maintain(set())
    [kept] = repo.list_envs()
    assert kept.id == plans[1].entry.id and kept.state is EnvState.READY
    assert set(runtime.volumes) == {kept.volume}
    hit = store.prepare(new_job(repo), sha)
    assert hit.mode is EnvMode.USE and hit.entry is not None and hit.entry.id == kept.id


def _runner_args(mode: str, env_dir: Path, workdir: Path, sha: str) -> object:
    import argparse

    return argparse.Namespace(env_mode=mode, env_dir=str(env_dir), env_id="e1",
                              env_sha256=sha, env_note="a note", workdir=str(workdir))


def _frames(path: Path) -> list[tuple[str, str]]:
    return [(kind, text) for _, kind, text in map(json.loads, path.read_text().splitlines())]


def test_runner_uses_a_sound_environment_and_falls_back_without_venv(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import platform

    from ci_controller import runner_entry

    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "requirements.txt").write_text("six\n")
    sha = hashlib.sha256(b"six\n").hexdigest()
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text("")
    (env / "bin" / "python").chmod(0o755)
    (env / ENV_MARKER).write_text(json.dumps({"requirements_sha256": sha,
                                              "python": platform.python_version()}))
    out = tmp_path / "frames"
    with open(out, "w") as handle:
        emitter = runner_entry.Emitter(handle.fileno())
        runner = runner_entry.Runner(emitter)
        used = runner_entry.prepare_env(_runner_args("use", env, workdir, sha), emitter, runner,
                                        str(workdir / "requirements.txt"))
        assert used == str(env / "bin" / "python")
        # An image whose Python cannot make a venv: installed as without the cache.
        monkeypatch.setattr(runner_entry, "make_venv", lambda env_dir, cwd: False)
        monkeypatch.setattr(runner_entry, "install_system", lambda *args: True)
        plain = runner_entry.prepare_env(_runner_args("build", tmp_path / "new", workdir, sha),
                                         emitter, runner, str(workdir / "requirements.txt"))
        assert plain == sys.executable
    frames = _frames(out)
    assert frames[:2] == [("stdout", "[ci] a note\n"), ("phase", "env used e1")]
    assert not any(text.startswith("env built") for _, text in frames)
    assert ("stdout", "[ci] cannot make a virtualenv in this image; installing into its "
                      "Python, uncached\n") in frames
