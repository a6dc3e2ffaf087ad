"""The container spec for a job: a pure function of the settings and the job's id and options.

The image is the one CI_PYTHON_IMAGES names for the job's Python version; the pytest
arguments go to the runner as one JSON argv entry (no shell anywhere), which hands them to
pytest as separate arguments.

Hardening: not privileged, every capability dropped (pip and pytest run as root inside the
container and need none of them: root owns every path they write), no privilege escalation,
limits on processes, memory (no swap) and CPU, a bounded log file, and no host path mounted
except the CA bundle (read-only). The engine socket is never mounted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ci_common.pytest_args import pytest_args_to_json
from ci_common.settings import Settings
from ci_controller.envcache import ENV_DIR, NO_CACHE, EnvMode, EnvPlan, runner_args
from ci_controller.runtime import ContainerSpec, Mount

LABEL_JOB_ID = "ci.job_id"
LABEL_CONTROLLER_ID = "ci.controller_id"
LABEL_INSTALLATION_ID = "ci.installation_id"

RUNNER_DIR = "/ci"
RUNNER_PATH = f"{RUNNER_DIR}/runner_entry.py"
ARCHIVE_PATH = f"{RUNNER_DIR}/source.zip"
WORK_DIR = f"{RUNNER_DIR}/work"
CA_BUNDLE_PATH = "/etc/ci/ca-bundle.crt"

# Verified by tests/e2e/test_controller_docker.py: `pip install` from the index and pytest
# (tmp_path included) work as root with no capability at all.
CAPABILITIES: tuple[str, ...] = ()

# The engine's own log file for the container: json-file grows without bound unless capped.
# The database keeps the tail of the output (CI_LOG_LIMIT); the file only needs to hold what the
# controller has not read yet, so twice the limit (framing adds overhead) and at least 16 MB.
# The runner (given the limit) writes at most a few MB/s and drops what the cap would drop
# anyway, so the controller does not fall a whole file behind; if it still does, the frames
# rotated away unread leave a marker in the log (see follower.py).
MIN_LOG_FILE_BYTES = 16 * 1024**2

BASE_ENVIRONMENT: Mapping[str, str] = {
    "PYTHONUNBUFFERED": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PIP_BREAK_SYSTEM_PACKAGES": "1",
    "PIP_ROOT_USER_ACTION": "ignore",
}
CA_ENVIRONMENT_NAMES = ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


def container_name(settings: Settings, job_id: str) -> str:
    """`{container_prefix}{job_id}`: one container per job, found again by name after a crash."""
    return f"{settings.container_prefix}{job_id}"


def controller_labels(settings: Settings, installation_id: str) -> dict[str, str]:
    """The labels that select every container this controller owns.

    The controller id alone is not enough: it defaults to the host name, so two installations
    on one engine share it. The installation id tells them apart.
    """
    return {LABEL_INSTALLATION_ID: installation_id, LABEL_CONTROLLER_ID: settings.controller_id}


def runner_command(settings: Settings, pytest_args: Sequence[str] = (),
                   env_args: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The container's command: the runner script with the archive and log limits."""
    command: tuple[str, ...] = (
        "python3", RUNNER_PATH,
        "--archive", ARCHIVE_PATH,
        "--workdir", WORK_DIR,
        "--max-bytes", str(settings.max_unpacked_bytes),
        "--max-entries", str(settings.max_archive_entries),
        "--log-limit", str(settings.log_limit_bytes),
    )
    if pytest_args:
        command += ("--pytest-args", pytest_args_to_json(pytest_args))
    return command + env_args


def container_environment(settings: Settings) -> dict[str, str]:
    """Unbuffered Python, quiet pip as root, and the CA bundle when one is configured."""
    environment = dict(BASE_ENVIRONMENT)
    if settings.ca_bundle:
        environment.update({name: CA_BUNDLE_PATH for name in CA_ENVIRONMENT_NAMES})
    return environment


def log_file_bytes(settings: Settings) -> int:
    """Cap of the engine's json-file log for one container."""
    return max(2 * settings.log_limit_bytes, MIN_LOG_FILE_BYTES)


def job_container_spec(settings: Settings, job_id: str, installation_id: str, *,
                       pytest_args: Sequence[str] = (),
                       python_version: str | None = None,
                       env: EnvPlan = NO_CACHE, requirements_sha256: str = "") -> ContainerSpec:
    """The hardened container spec for one job.

    Raises InvalidInput when this controller has no image for the job's Python version (its
    CI_PYTHON_IMAGES differs from the server's): the job fails as it could not start.

    With a cached environment (see envcache.py) its volume is mounted at ENV_DIR: writable
    for the job that builds it, read-only for the jobs that use it.
    """
    mounts: tuple[Mount, ...] = ()
    if settings.ca_bundle:
        mounts = (Mount(source=settings.ca_bundle, target=CA_BUNDLE_PATH, read_only=True),)
    if env.entry is not None and env.mode is not EnvMode.NONE:
        mounts += (Mount(source=env.entry.volume, target=ENV_DIR,
                         read_only=env.mode is EnvMode.USE, volume=True),)
    return ContainerSpec(
        image=settings.python_images().image_for(python_version),
        name=container_name(settings, job_id),
        command=runner_command(settings, pytest_args, runner_args(env, requirements_sha256)),
        labels={LABEL_JOB_ID: job_id, **controller_labels(settings, installation_id)},
        environment=container_environment(settings),
        working_dir=RUNNER_DIR,
        mounts=mounts,
        privileged=False,
        cap_drop=("ALL",),
        cap_add=CAPABILITIES,
        security_opt=("no-new-privileges",),
        pids_limit=settings.job_pids_limit,
        mem_limit_bytes=settings.job_memory_bytes,
        memswap_limit_bytes=settings.job_memory_bytes,
        nano_cpus=int(settings.job_cpus * 1_000_000_000),
        init=True,
        log_config={
            "type": "json-file",
            "config": {"max-size": str(log_file_bytes(settings)), "max-file": "2"},
        },
    )
