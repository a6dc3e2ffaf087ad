"""What users of a CI expect (issue #11), for real: pytest arguments after `--`, `--python`,
`--junit-xml`, the queue position while a job waits, and shell completion of the installed `ci`.

One deployment runs one job at a time, so jobs queue behind each other; the Python 3.13 image
comes from `scripts/ensure-docker --suite trixie` (built when missing: the test fails, never
skips, when it cannot be had).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

import httpx
import pytest

from tests.e2e.harness import (
    REPO_ROOT,
    Deployment,
    Process,
    job_id_from,
    submit_async,
    write_project,
)

pytestmark = pytest.mark.docker

TRIXIE_IMAGE = "ci-runner:debian-trixie-py3.13"


@pytest.fixture(scope="session")
def trixie_image() -> str:
    """The Python 3.13 runner image, provisioned by the project's own script."""
    result = subprocess.run([str(REPO_ROOT / "scripts" / "ensure-docker"), "--suite", "trixie"],
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"scripts/ensure-docker --suite trixie failed:\n{result.stderr[-2000:]}")
    image = result.stdout.strip().splitlines()[-1]
    assert image == TRIXIE_IMAGE
    return image


@pytest.fixture(scope="session")
def python_images(runner_image: str, trixie_image: str) -> tuple[str, str]:
    """CI_PYTHON_IMAGES for the default runner image (under its real version) and 3.13."""
    version = subprocess.run(
        ["docker", "run", "--rm", runner_image, "python3", "-c",
         "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert version != "3.13", "the default runner image must be another Python than 3.13"
    return f"{version}={runner_image},3.13={trixie_image}", version


def one_line_error(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    return detail


def wait_until_running(server: Process, key: str, job_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{server.url}/jobs/{job_id}",
                        headers={"Authorization": f"Bearer {key}"}).json()
        if job["status"] == "running":
            return
        assert job["status"] == "queued", job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not start in time")


def test_pytest_args_python_junit_and_queue_position(deployment: Deployment, tmp_path: Path,
                                                     python_images: tuple[str, str]) -> None:
    images, default = python_images
    deployment.extra_env.update(CI_PYTHON_IMAGES=images, CI_MAX_CONCURRENT_JOBS="1")
    deployment.start_controller()
    server = deployment.start_server()
    user, other = deployment.create_user(), deployment.create_user()
    auth = {"Authorization": f"Bearer {user.api_key}"}

    # What a submission may choose, without a key.
    assert httpx.get(f"{server.url}/info").json() == {"python_versions": [default, "3.13"],
                                                      "default_python": default}

    # Refused before any job exists: one line, exit 2 from the CLI, 400 from the API.
    project = write_project(tmp_path / "p", {
        "test_pick.py": (
            "import sys\n"
            "def test_slow_on_313():\n    assert sys.version_info[:2] == (3, 13)\n"
            "def test_fast():\n    assert False, 'deselected by -k'\n"
            "def test_slow_skipme():\n    assert False, 'deselected by -k'\n")})
    refused = deployment.ci("submit", "test", "--", "-p", "no:junitxml", cwd=project,
                            server=server, api_key=user.api_key)
    assert refused.returncode == 2 and refused.stderr.count("Error:") == 1, refused.stderr
    assert "'-p'" in refused.stderr
    zipped = {"archive": ("p.zip", b"PK\x05\x06" + b"\0" * 18, "application/zip")}
    detail = one_line_error(httpx.post(f"{server.url}/jobs", headers=auth, files=zipped,
                                       data={"pytest_args": '["--junitxml=/tmp/x.xml"]'}))
    assert "--junitxml" in detail
    detail = one_line_error(httpx.post(f"{server.url}/jobs", headers=auth, files=zipped,
                                       data={"python": "2.7"}))
    assert f"{default}, 3.13" in detail
    assert httpx.get(f"{server.url}/jobs", headers=auth).json()["total"] == 0

    # A job holds the one slot; a second waits; the third is watched from its submission.
    blocker = write_project(tmp_path / "blocker", {
        "test_sleep.py": "import time\ndef test_sleep():\n    time.sleep(5)\n"})
    first = submit_async(deployment, server, blocker, user.api_key)
    wait_until_running(server, user.api_key, first)
    submit_async(deployment, server, blocker, user.api_key)
    junit = tmp_path / "out" / "report.xml"
    junit.parent.mkdir()
    result = deployment.ci("submit", "test", "--python", "3.13", "--junit-xml", str(junit),
                           "--", "-k", "slow and not skipme", "-x", cwd=project, server=server,
                           api_key=user.api_key)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    # Not a terminal: one plain line per change, in order, all before the job starts.
    assert "Queued: 1 job ahead" in lines and "Queued: next in line" in lines, lines
    assert lines.index("Queued: 1 job ahead") < lines.index("Queued: next in line") \
        < lines.index("Status: running")
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr
    assert "-k 'slow and not skipme' -x" in result.stdout  # the command as pytest got it
    assert "1 passed, 2 deselected" in result.stdout
    cases = [case.get("name") for case in ElementTree.parse(junit).getroot().iter("testcase")]
    assert cases == ["test_slow_on_313"]

    job_id = job_id_from(result.stderr)
    shown = json.loads(deployment.ci("show", job_id, "--json", server=server,
                                     api_key=user.api_key).stdout)
    assert shown["pytest_args"] == ["-k", "slow and not skipme", "-x"]
    assert shown["python_version"] == "3.13"
    text = deployment.ci("show", job_id, server=server, api_key=user.api_key).stdout
    assert "Python:" in text and "3.13" in text and "-k 'slow and not skipme' -x" in text
    foreign = httpx.get(f"{server.url}/jobs/{job_id}/junit",
                        headers={"Authorization": f"Bearer {other.api_key}"})
    assert foreign.status_code == 404 and "report" not in foreign.text

    # No report (pip failed): said in one line, the job's exit code kept, no file written.
    broken = write_project(tmp_path / "broken", {"test_ok.py": "def test_ok():\n    pass\n"},
                           requirements="definitely-not-a-package-ci-e2e==0.0.1\n")
    missing = tmp_path / "out" / "missing.xml"
    result = deployment.ci("submit", "test", "--junit-xml", str(missing), cwd=broken,
                           server=server, api_key=user.api_key)
    assert result.returncode == 1, result.stderr
    said = [line for line in result.stderr.splitlines() if "JUnit" in line]
    assert len(said) == 1 and "dependency installation failed" in said[0], result.stderr
    assert not missing.exists()
    # ci wait on the finished job writes the report of the earlier one, as submit did.
    again = tmp_path / "out" / "again.xml"
    waited = deployment.ci("wait", job_id, "--junit-xml", str(again), server=server,
                           api_key=user.api_key)
    assert waited.returncode == 0 and again.read_bytes() == junit.read_bytes()


def test_the_installed_ci_completes_its_subcommands(tmp_path: Path) -> None:
    ci = Path(sys.executable).parent / "ci"
    assert ci.exists(), f"the `ci` console script is not installed beside {sys.executable}"
    env = {**os.environ, "_CI_COMPLETE": "bash_complete", "COMP_WORDS": "ci s",
           "COMP_CWORD": "1"}
    result = subprocess.run([str(ci)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["plain,show", "plain,submit"]
    env.update(COMP_WORDS="ci submit test --ju", COMP_CWORD="3")
    result = subprocess.run([str(ci)], env=env, capture_output=True, text=True, timeout=30)
    assert result.stdout.split() == ["plain,--junit-xml"]
    env.pop("COMP_WORDS"), env.pop("COMP_CWORD")
    for shell, marker in (("bash", "complete -o nosort -F"), ("zsh", "compdef"),
                          ("fish", "complete --no-files --command ci")):
        env["_CI_COMPLETE"] = f"{shell}_source"
        script = subprocess.run([str(ci)], env=env, capture_output=True, text=True, timeout=30)
        assert script.returncode == 0 and marker in script.stdout, (shell, script.stdout)
