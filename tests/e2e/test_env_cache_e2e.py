"""The installed-environment cache for real: volumes on the Docker engine, pip through the proxy.

Few and short on purpose (each install reaches PyPI): jobs that do not depend on each other run
side by side. The rules checked: a second job of one key starts without pip; another user,
another requirements.txt, another image or `--no-cache` installs afresh; a failed install is
never cached; a volume removed behind the controller's back, or an environment left without
its marker (half-written), is rebuilt and the job passes; beyond CI_ENV_CACHE_SIZE the least
recently used goes; `ci-admin cache prune` empties it.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import docker
import pytest

from ci_common.models import EnvEntry, EnvState
from ci_common.python_images import parse_python_images
from tests.e2e.harness import Deployment, Process, job_id_from, write_project

pytestmark = pytest.mark.docker

REQUIREMENTS = "pytest\niniconfig\n"
USES_INICONFIG = "import iniconfig\n\ndef test_ok():\n    assert iniconfig.IniConfig\n"
MISS = "[ci] installing dependencies (no cached environment)"
HIT = "[ci] using cached environment (built "
PIP = "$ python -m pip install"


def submit(dep: Deployment, project: Path, key: str,
           *args: str) -> subprocess.Popen[str]:
    server = next(p for p in dep.processes if p.name == "server")
    return dep.ci_popen("submit", "test", *args, cwd=project, server=server, api_key=key)


def finish(*procs: subprocess.Popen[str]) -> list[tuple[int, str]]:
    """(exit code, stdout + stderr) of each `ci submit test`, in order."""
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        results.append((proc.returncode, out + err))
    return results


def entries(dep: Deployment) -> list[EnvEntry]:
    repository = dep.open_repository()
    try:
        return repository.list_envs()
    finally:
        repository.close()


def wait_until(check, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def volume_names(label: str) -> set[str]:
    client = docker.from_env()
    try:
        found = (client.api.volumes(filters={"label": label}) or {}).get("Volumes") or []
        return {volume["Name"] for volume in found}
    finally:
        client.close()


def test_cache_rules_end_to_end(deployment: Deployment, tmp_path: Path) -> None:
    dep = deployment
    dep.start_controller()
    dep.start_server()
    alice, bob = dep.create_user(), dep.create_user()
    project = write_project(tmp_path / "p", {"test_ok.py": USES_INICONFIG}, REQUIREMENTS)
    changed = write_project(tmp_path / "p2", {"test_ok.py": USES_INICONFIG},
                            REQUIREMENTS + "# pinned later\n")
    broken = write_project(tmp_path / "bad", {"test_ok.py": USES_INICONFIG},
                           "pytest\nci-no-such-package-zz9==0.0.1\n")

    # A first job builds; a failed install runs beside it.
    [(code, first), (failed_code, failed)] = finish(submit(dep, project, alice.api_key),
                                                    submit(dep, broken, alice.api_key))
    assert code == 0, first
    assert MISS in first and PIP in first and "1 passed" in first
    assert failed_code == 1 and "dependency installation failed" in failed
    wait_until(lambda: [e.state for e in entries(dep)] == [EnvState.READY])

    # Same key: no pip. Another user, another requirements.txt: their own builds. The failed
    # install was not cached: it tries again. All side by side.
    results = finish(submit(dep, project, alice.api_key), submit(dep, project, bob.api_key),
                     submit(dep, changed, alice.api_key), submit(dep, broken, alice.api_key))
    (hit_code, hit), (bob_code, bob_out), (changed_code, changed_out), (again_code, again) = results
    assert hit_code == 0 and HIT in hit and PIP not in hit and "1 passed" in hit, hit
    assert bob_code == 0 and MISS in bob_out, bob_out
    assert changed_code == 0 and MISS in changed_out, changed_out
    assert again_code == 1 and MISS in again, again
    wait_until(lambda: len([e for e in entries(dep) if e.state is EnvState.READY]) == 3)
    ready = [e for e in entries(dep) if e.state is EnvState.READY]
    assert len({e.key for e in ready}) == 3 and all(e.size_bytes > 1_000_000 for e in ready)
    bobs = next(e for e in ready if e.job_id == job_id_from(bob_out))
    alices = next(e for e in ready if e.job_id == job_id_from(first))
    assert bobs.key.user_id != alices.key.user_id
    assert bobs.key.requirements_sha256 == alices.key.requirements_sha256
    assert all(e.python_version.startswith("3.") for e in ready)
    assert volume_names(dep.label()) == {e.volume for e in entries(dep)}

    # Half-written: the marker is gone. The job installs afresh and passes; the entry goes.
    _run_in_volume(dep.runner_image, alices.volume, "rm /e/.ci-env.json")
    [(code, out)] = finish(submit(dep, project, alice.api_key))
    assert code == 0 and "cached environment unusable" in out and "1 passed" in out, out
    wait_until(lambda: alices.volume not in {e.volume for e in entries(dep)})
    wait_until(lambda: alices.volume not in volume_names(dep.label()))

    # --no-cache builds afresh (the new one replaces the old); then the volume vanishes
    # behind the controller's back: the next job rebuilds and passes.
    [(code, out)] = finish(submit(dep, project, alice.api_key, "--no-cache"))
    assert code == 0 and "installing dependencies (--no-cache" in out and PIP in out, out
    fresh = next(e for e in entries(dep) if e.job_id == job_id_from(out))
    [(code, out)] = finish(submit(dep, project, alice.api_key))
    assert code == 0 and HIT in out, out
    wait_until(lambda: {e.state for e in entries(dep) if e.job_id == fresh.job_id}
               == {EnvState.READY})
    # Behind the controller's back (once the last job's container, removed after its result,
    # lets go of it).
    wait_until(lambda: subprocess.run(["docker", "volume", "rm", fresh.volume],
                                      capture_output=True).returncode == 0)
    [(code, out)] = finish(submit(dep, project, alice.api_key))
    assert code == 0 and MISS in out and "1 passed" in out, out


def test_another_image_eviction_and_admin_prune(deployment: Deployment, tmp_path: Path,
                                               runner_image: str) -> None:
    dep = deployment
    relabelled = f"ci-test-env-cache:{dep.run_id}"
    subprocess.run(["docker", "build", "-q", "-t", relabelled, "-"], check=True,
                   input=f"FROM {runner_image}\nLABEL ci.test={dep.run_id}\n", text=True,
                   capture_output=True)
    try:
        controller = dep.start_controller()
        dep.start_server()
        user = dep.create_user()
        project = write_project(tmp_path / "p", {"test_ok.py": USES_INICONFIG}, REQUIREMENTS)
        [(code, out)] = finish(submit(dep, project, user.api_key))
        assert code == 0 and MISS in out, out
        [first] = entries(dep)
        # Another image, and a budget that holds one environment of this size, not two.
        _restart_controller(dep, controller, CI_PYTHON_IMAGES=_default_image_is(dep, relabelled),
                            CI_ENV_CACHE_SIZE=str(first.size_bytes * 3 // 2))
        [(code, out)] = finish(submit(dep, project, user.api_key))
        assert code == 0 and MISS in out, out  # another image id: not the first one's
        [(code, out)] = finish(submit(dep, project, user.api_key))
        assert code == 0 and HIT in out, out  # and a restart lost nothing
        # Over the budget: the least recently used (the first image's) is evicted.
        wait_until(lambda: all(e.key.image_id != first.key.image_id for e in entries(dep)))
        [second] = entries(dep)
        assert second.state is EnvState.READY and second.key.image_id != first.key.image_id
        wait_until(lambda: volume_names(dep.label()) == {second.volume})

        listed = json.loads(dep.admin("cache", "list", "--json").stdout)
        assert [(e["user_email"], e["state"], e["volume"]) for e in listed] == [
            (user.email, "ready", second.volume)]
        assert "Marked 1 cached environment for removal" in dep.admin("cache", "prune").stdout
        wait_until(lambda: not entries(dep) and not volume_names(dep.label()))
        [(code, out)] = finish(submit(dep, project, user.api_key))
        assert code == 0 and MISS in out, out
    finally:
        subprocess.run(["docker", "image", "rm", "-f", relabelled], capture_output=True)


# ----------------------------------------------------------------------------- helpers
def _run_in_volume(image: str, volume: str, command: str) -> None:
    subprocess.run(["docker", "run", "--rm", "-v", f"{volume}:/e", image, "sh", "-c", command],
                   check=True, capture_output=True)


def _default_image_is(dep: Deployment, image: str) -> str:
    """CI_PYTHON_IMAGES as the deployment has it, with the default version's image replaced."""
    env = dep.env()
    images = parse_python_images(env.get("CI_PYTHON_IMAGES"), env["CI_RUNNER_IMAGE"]).images
    return ",".join(f"{version}={image if number == 0 else known}"
                    for number, (version, known) in enumerate(images))


def _restart_controller(dep: Deployment, controller: Process, **env: str) -> Process:
    controller.terminate()
    dep.processes.remove(controller)
    return dep.start_controller(**env)
