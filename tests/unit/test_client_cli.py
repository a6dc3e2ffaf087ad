"""The `ci` command end to end in one process: click's CliRunner against the real FastAPI app.

The app is `ci_server.app.create_app` over an InMemoryRepository, reached through Starlette's
test transport. A thread stands in for the controller where a job must make progress.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result
from starlette.exceptions import StarletteDeprecationWarning

from ci_client.cli import CLIState, cli
from ci_common.keys import generate_key
from ci_common.models import JobOutcome, JobStatus, OutputChunk, OutputStream, TestReport, utcnow
from ci_common.settings import Settings
from ci_persistence.memory import InMemoryRepository
from ci_server.app import create_app
from tests.leases import hold_lease, owner_fence

with warnings.catch_warnings():  # Starlette suggests httpx2; its transport works on httpx
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

pytestmark = pytest.mark.timeout(60)

SERVER = "http://testserver"
PASSED = JobOutcome(JobStatus.COMPLETED, 0, True, None)
TESTS_FAILED = JobOutcome(JobStatus.COMPLETED, 1, False, None)
INSTALL_FAILED = JobOutcome(JobStatus.FAILED, None, False, "dependency installation failed")


class Wire(httpx.BaseTransport):
    """The test client's transport, plus what a real network adds: hosts that are down, and a
    hook on each chunk of an event stream (to interrupt it, or to notice keep-alives)."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.down_hosts: set[str] = set()
        self.on_event_chunk: list[Callable[[bytes], None]] = []
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host in self.down_hosts:
            raise httpx.ConnectError("Connection refused", request=request)
        response = self.inner.handle_request(request)
        if not request.url.path.endswith("/events"):
            return response
        assert isinstance(response.stream, httpx.SyncByteStream)
        return httpx.Response(response.status_code, headers=response.headers,
                              stream=_Hooked(response.stream, self.on_event_chunk),
                              extensions=response.extensions, request=request)


class _Hooked(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, hooks: list[Callable[[bytes], None]]) -> None:
        self.inner = inner
        self.hooks = hooks

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            yield chunk
            for hook in self.hooks:
                hook(chunk)

    def close(self) -> None:
        self.inner.close()


@dataclass
class Service:
    repo: InMemoryRepository
    wire: Wire
    key: str
    user_id: str
    tmp: Path
    errors: list[BaseException] = field(default_factory=list)

    def run(self, *args: str, env: dict[str, str] | None = None,
            transport: httpx.BaseTransport | None = None, network: bool = False) -> Result:
        """Run `ci ARGS` through the wire (or `transport`, or the real network)."""
        environ = {"CI_API_KEY": self.key, "CI_SERVER_URL": SERVER} if env is None else env
        if not network and transport is None:
            transport = self.wire
        state = CLIState(transport=transport, environ=environ,
                         config_path=self.tmp / "no-config")
        return CliRunner().invoke(cli, list(args), obj=state)

    def job(self, chunks: list[str] | None = None, outcome: JobOutcome | None = None) -> str:
        """A job created directly in the repository, optionally run to an outcome."""
        job = self.repo.create_job(self.user_id, b"zip", None)
        if chunks is not None or outcome is not None:
            self.repo.claim_next_job(hold_lease(self.repo, "fake-controller"))
            self.repo.mark_running(job.id, "container", utcnow(),
                                   fence=owner_fence(self.repo, job.id))
            self._output(job.id, chunks or [])
        if outcome is not None:
            self.repo.finish_job(job.id, outcome, utcnow(), fence=owner_fence(self.repo, job.id))
        return job.id

    def _output(self, job_id: str, chunks: list[str]) -> None:
        for number, text in enumerate(chunks, start=1):
            self.repo.append_output(job_id, [OutputChunk(OutputStream.STDOUT, text)], number,
                                    fence=owner_fence(self.repo, job_id))

    def controller(self, chunks: list[str], outcome: JobOutcome,
                   start: threading.Event | None = None) -> threading.Thread:
        """A thread playing the controller: claim the next job, run it, finish it."""
        def work() -> None:
            try:
                deadline = time.monotonic() + 30
                job = None
                while job is None and time.monotonic() < deadline:
                    job = self.repo.claim_next_job(hold_lease(self.repo, "fake-controller"))
                    time.sleep(0.01)
                assert job is not None, "no job was submitted"
                if start is not None:
                    assert start.wait(30)
                self.repo.mark_running(job.id, "container", utcnow(),
                                       fence=owner_fence(self.repo, job.id))
                self._output(job.id, chunks)
                self.repo.finish_job(job.id, outcome, utcnow(),
                                     fence=owner_fence(self.repo, job.id))
            except BaseException as exc:  # reported by the test through service.errors
                self.errors.append(exc)
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        return thread


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    repo = InMemoryRepository()
    user = repo.create_user("Ada", "ada@example.com")
    key = generate_key()
    repo.create_api_key(user.id, "dev", key.key_hash, key.prefix)
    settings = Settings(sse_keepalive_s=0.05, event_poll_interval_s=0.002,
                        max_upload_bytes=1024 * 1024)
    with TestClient(create_app(settings, repo)) as test_client:
        yield Service(repo, Wire(test_client._transport), key.plaintext, user.id, tmp_path)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "src" / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    (root / "tests").mkdir()
    (root / "tests" / "test_calc.py").write_text("def test_add():\n    assert 1 + 1 == 2\n")
    (root / "requirements.txt").write_text("pytest\n")
    (root / ".venv").mkdir()
    (root / ".venv" / "junk.py").write_text("x")
    monkeypatch.chdir(root)
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------- submit


def test_submit_streams_output_to_stdout_and_status_to_stderr(service: Service,
                                                              project: Path) -> None:
    chunks = ["collected 1 item\n\n", "tests/test_calc.py \x1b[32m.\x1b[0m", "\n1 passed ✓\n"]
    thread = service.controller(chunks, PASSED)
    result = service.run("submit", "test")
    thread.join(10)
    assert service.errors == []
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "".join(chunks)  # byte for byte, colour codes included
    job = service.repo.list_jobs(service.user_id)[0]
    lines = result.stderr.splitlines()
    # Where it stands while it waits, if the relay placed it before the fake controller
    # claimed it (timing): only between the queued and the running status.
    queued = [i for i, line in enumerate(lines) if line.startswith("Queued: ")]
    assert all(lines.index("Status: queued") < i < lines.index("Status: running")
               for i in queued)
    assert [line for line in lines if not line.startswith("Queued: ")] == [
        result.stderr.splitlines()[0],
        "Uploading…",
        f"Job submitted: {job.id}",
        "Status: queued",
        "Status: running",
        "✓ Tests passed (exit code 0)",
    ]
    assert result.stderr.startswith("Packing project… 3 files, ")
    with zipfile.ZipFile(io.BytesIO(service.repo.get_archive(job.id))) as zf:
        assert sorted(n for n in zf.namelist() if not n.endswith("/")) == [
            "requirements.txt", "src/calc.py", "tests/test_calc.py"]


@pytest.mark.parametrize(("outcome", "line"), [
    (TESTS_FAILED, "✗ Tests failed (exit code 1)"),
    (INSTALL_FAILED, "✗ Job failed: dependency installation failed"),
    (JobOutcome(JobStatus.CANCELLED, None, False, "cancelled by user"), "✗ Job cancelled"),
])
def test_submit_exits_1_when_the_tests_did_not_pass(service: Service, project: Path,
                                                    outcome: JobOutcome, line: str) -> None:
    thread = service.controller(["E   assert 3 == 2\n"], outcome)
    result = service.run("submit", "test")
    thread.join(10)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == line


def test_submit_async_prints_the_id_on_stdout(service: Service, project: Path) -> None:
    result = service.run("submit", "test", "--async", "--timeout", "90")
    assert result.exit_code == 0, result.stderr
    job = service.repo.list_jobs(service.user_id)[0]
    assert result.stdout == f"Job submitted: {job.id}\n"
    assert job.status is JobStatus.QUEUED and job.timeout_seconds == 90.0
    assert "Status:" not in result.stderr


def test_submit_outside_a_project_exits_2_naming_what_is_missing(
        service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "elsewhere" / "src").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = service.run("submit", "test")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ")
    assert "missing tests/, requirements.txt " in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert service.repo.list_jobs(service.user_id) == []


def test_the_servers_413_detail_is_shown_as_is(service: Service, project: Path) -> None:
    (project / "src" / "noise.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    result = service.run("submit", "test", "--max-upload", "100MB")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith("Error: ")
    assert "1.0 MB" in result.stderr  # the server's limit, in the server's words
    assert service.repo.list_jobs(service.user_id) == []


def test_the_client_limit_refuses_before_uploading(service: Service, project: Path) -> None:
    (project / "src" / "noise.bin").write_bytes(os.urandom(300 * 1024))
    result = service.run("submit", "test", "--max-upload", "200k")
    assert result.exit_code == 1
    assert re.fullmatch(r"Error: project archive is 30\d\.\d KB, over the server's 200\.0 KB "
                        r"limit \(leave files out with \.gitignore\)\n", result.stderr)
    assert service.wire.requests == []


def test_ctrl_c_during_submit_cancels_the_job(service: Service, project: Path) -> None:
    def interrupt(chunk: bytes) -> None:
        if b"event: status" in chunk:
            raise KeyboardInterrupt
    service.wire.on_event_chunk.append(interrupt)
    result = service.run("submit", "test")
    job = service.repo.list_jobs(service.user_id)[0]
    assert result.exit_code == 130
    assert result.stderr.splitlines()[-1] == f"Job {job.id} cancelled"
    assert "Traceback" not in result.stderr
    assert job.status is JobStatus.CANCELLED and job.reason == "cancelled by user"


# ---------------------------------------------------------------------- wait


def test_wait_on_a_finished_job_says_so_and_exits_with_its_result(service: Service) -> None:
    passed = service.job(["ok\n"], PASSED)
    failed = service.job(["boom\n"], JobOutcome(JobStatus.FAILED, None, False, "timed out"))
    result = service.run("wait", passed)
    assert (result.exit_code, result.stdout, result.stderr) == (
        0, "", "Job already completed: passed\n")
    result = service.run("wait", failed)
    assert (result.exit_code, result.stdout, result.stderr) == (
        1, "", "Job already failed: timed out\n")


def test_wait_all_replays_everything_from_the_start(service: Service) -> None:
    job_id = service.job(["one\n", "two\n"], TESTS_FAILED)
    result = service.run("wait", job_id, "--all")
    assert result.exit_code == 1
    assert result.stdout == "one\ntwo\n"
    assert result.stderr.splitlines() == [
        "Status: queued", "Status: running", "✗ Tests failed (exit code 1)"]


def test_wait_shows_only_what_comes_after_now(service: Service) -> None:
    job_id = service.job(["old line\n"])
    listening = threading.Event()
    # A keep-alive reaching the client means the server has passed "now" and is live.

    def notice_keepalive(chunk: bytes) -> None:
        if chunk.startswith(b":"):
            listening.set()
    service.wire.on_event_chunk.append(notice_keepalive)

    def finish() -> None:
        if listening.wait(30):
            service.repo.append_output(job_id, [OutputChunk(OutputStream.STDOUT, "new\n")], 2,
                                       fence=owner_fence(service.repo, job_id))
            service.repo.finish_job(job_id, PASSED, utcnow(),
                                    fence=owner_fence(service.repo, job_id))
    thread = threading.Thread(target=finish, daemon=True)
    thread.start()
    result = service.run("wait", job_id)
    thread.join(10)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "new\n"
    assert result.stderr.splitlines() == ["Status: running", "✓ Tests passed (exit code 0)"]


def test_a_dropped_stream_resumes_without_gaps_or_repeats(service: Service) -> None:
    job_id = service.job(["one\n", "two\n", "three\n"], PASSED)
    outputs_seen: list[bytes] = []

    def drop_once_after_the_second_output(chunk: bytes) -> None:
        if b"event: output" in chunk:
            outputs_seen.append(chunk)
            if len(outputs_seen) == 2:
                raise httpx.ReadError("connection reset by peer")
    service.wire.on_event_chunk.append(drop_once_after_the_second_output)
    result = service.run("wait", job_id, "--all")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "one\ntwo\nthree\n"
    assert result.stderr.splitlines() == [
        "Status: queued", "Status: running", "✓ Tests passed (exit code 0)"]
    streams = [r for r in service.wire.requests if r.url.path.endswith("/events")]
    assert len(streams) == 2
    assert "last-event-id" not in streams[0].headers
    assert streams[1].headers["last-event-id"] == "4"  # queued, running, one, two


def test_ctrl_c_during_wait_leaves_the_job_running(service: Service) -> None:
    job_id = service.job(["line\n"])

    def interrupt(chunk: bytes) -> None:
        raise KeyboardInterrupt
    service.wire.on_event_chunk.append(interrupt)
    result = service.run("wait", job_id, "--all")
    assert result.exit_code == 130
    assert f"job {job_id} continues to run" in result.stderr
    assert f"ci wait {job_id}" in result.stderr
    assert service.repo.get_job(job_id).status is JobStatus.RUNNING
    assert not service.repo.get_job(job_id).cancel_requested


def test_wait_for_an_unknown_or_foreign_job_is_not_found(service: Service) -> None:
    other = service.repo.create_user("Bob", "bob@example.com")
    foreign = service.repo.create_job(other.id, b"zip", None).id
    for job_id in (foreign, "no-such-job"):
        result = service.run("wait", job_id)
        assert result.exit_code == 1
        assert result.stderr == f"Error: job {job_id} not found\n"


# ---------------------------------------------------------------------- list


def test_list_prints_the_table_newest_first(service: Service) -> None:
    first = service.job(["x\n"], PASSED)
    second = service.job(["x\n"])
    result = service.run("list")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["JOB", "ID", "STATUS", "START", "TIME", "END", "TIME", "SUCCESS",
                                "TESTS"]
    assert lines[1] == "-" * 130
    assert lines[2].startswith(f"{second}   running      ")
    assert lines[2].endswith("N/A                    -         -")
    assert lines[3].startswith(f"{first}   completed    ") and lines[3].endswith("✓         -")


def test_list_json_and_limit(service: Service) -> None:
    ids = [service.job(["x\n"], PASSED) for _ in range(3)]
    result = service.run("list", "--json", "--limit", "2")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert [job["id"] for job in payload] == ids[::-1][:2]
    assert set(payload[0]) == {"id", "status", "success", "exit_code", "reason", "created_at",
                               "start_time", "end_time", "report", "pruned_at", "pytest_args",
                               "python_version"}
    assert payload[0]["success"] is True and payload[0]["exit_code"] == 0
    assert result.stderr == ""
    table = service.run("list", "--limit", "2")
    assert len(table.stdout.splitlines()) == 4
    assert table.stderr == "Showing the newest 2 of 3 jobs (see --limit).\n"


def test_options_after_the_subcommand_and_flag_beats_environment(service: Service) -> None:
    service.job()
    env = {"CI_API_KEY": "ci_" + "x" * 43, "CI_SERVER_URL": "http://dead.test:1"}
    service.wire.down_hosts.add("dead.test")
    result = service.run("list", "--api-key", service.key, "--server", SERVER, env=env)
    assert result.exit_code == 0, result.stderr
    result = service.run("--api-key", service.key, "--server", SERVER, "list", env=env)
    assert result.exit_code == 0, result.stderr
    result = service.run("list", env=env)
    assert result.stderr == "Error: cannot reach the CI server at http://dead.test:1 " \
                            "(is it running?)\n"


def test_fails_over_to_the_next_server(service: Service) -> None:
    service.job()
    service.wire.down_hosts.add("dead.test")
    result = service.run("list", "--server", f"http://dead.test:1,{SERVER}")
    assert result.exit_code == 0, result.stderr
    assert [r.url.host for r in service.wire.requests] == ["dead.test", "testserver"]


# ---------------------------------------------------------------------- errors


def test_authentication_errors_carry_the_servers_reason(service: Service) -> None:
    result = service.run("list", env={"CI_API_KEY": "ci_" + "y" * 43, "CI_SERVER_URL": SERVER})
    assert (result.exit_code, result.stderr) == (1, "Error: invalid API key\n")
    for key in service.repo.list_api_keys(service.user_id):
        service.repo.revoke_api_key(key.id)
    result = service.run("list")
    assert (result.exit_code, result.stderr) == (1, "Error: API key has been revoked\n")


def test_missing_key_says_how_to_provide_one(service: Service) -> None:
    result = service.run("list", env={"CI_SERVER_URL": SERVER})
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: no API key: pass --api-key")
    assert "CI_API_KEY" in result.stderr and "~/.ci/config" in result.stderr


def test_a_dead_server_is_one_line_and_debug_adds_the_traceback(service: Service) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    env = {"CI_API_KEY": service.key, "CI_SERVER_URL": url}
    result = service.run("list", env=env, network=True)  # the real network: refused
    assert (result.exit_code, result.stderr) == (
        1, f"Error: cannot reach the CI server at {url} (is it running?)\n")
    result = service.run("list", "--debug", env=env, network=True)
    assert result.exit_code == 1
    assert "Traceback" in result.stderr
    assert result.stderr.endswith(f"Error: cannot reach the CI server at {url} (is it running?)\n")


def test_the_default_server_is_localhost_8000(service: Service) -> None:
    result = service.run("list", env={"CI_API_KEY": service.key})
    assert result.exit_code == 0, result.stderr  # the in-process app answers for any host
    assert str(service.wire.requests[0].url).startswith("http://localhost:8000/jobs?")


def test_unexpected_errors_are_one_line_too(service: Service) -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("wires crossed")
    result = service.run("list", transport=httpx.MockTransport(broken))
    assert result.exit_code == 1
    assert result.stderr == ("Error: unexpected RuntimeError: wires crossed "
                             "(rerun with --debug for the traceback)\n")


# ---------------------------------------------------------------------- cancel, logs, show
def test_cancel_a_running_job_waits_until_it_has_stopped(service: Service) -> None:
    job_id = service.job(chunks=["working\n"])  # running: a controller must stop it

    def controller_stops_it() -> None:
        deadline = time.monotonic() + 30
        while not service.repo.get_job(job_id).cancel_requested:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)  # the container takes a moment to stop
        outcome = JobOutcome(JobStatus.CANCELLED, None, False, "cancelled by user")
        service.repo.finish_job(job_id, outcome, utcnow(),
                                fence=owner_fence(service.repo, job_id))

    stopper = threading.Thread(target=controller_stops_it, daemon=True)
    stopper.start()
    result = service.run("cancel", job_id)
    stopper.join(10)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [f"Cancelling job {job_id}…",
                                          f"Job {job_id} cancelled"]
    assert service.repo.get_job(job_id).status is JobStatus.CANCELLED


def test_cancel_a_queued_job_is_immediate_and_a_finished_one_is_not_an_error(
        service: Service) -> None:
    queued = service.repo.create_job(service.user_id, b"zip", None).id
    result = service.run("cancel", queued)
    assert (result.exit_code, result.stderr) == (0, f"Job {queued} cancelled\n")
    done = service.job(chunks=[], outcome=PASSED)
    result = service.run("cancel", done)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == (f"Job {done} had already finished; nothing to cancel: "
                             "✓ Tests passed (exit code 0)\n")
    assert service.repo.get_job(done).status is JobStatus.COMPLETED


def test_logs_prints_the_stored_output_and_returns(service: Service) -> None:
    job_id = service.job(chunks=["one\n", "two\n", "thr", "ee\n", "four ✓"])  # still running
    result = service.run("logs", job_id)
    assert (result.exit_code, result.stdout) == (0, "one\ntwo\nthree\nfour ✓")
    result = service.run("logs", job_id, "--tail", "2")
    assert (result.exit_code, result.stdout) == (0, "three\nfour ✓")
    assert service.run("logs", job_id, "--tail", "0").exit_code == 2


def test_logs_show_and_cancel_of_someone_elses_job_are_not_found(service: Service) -> None:
    other = service.repo.create_user("Bob", "bob@example.com")
    theirs = service.repo.create_job(other.id, b"zip", None).id
    for command in ("logs", "show", "cancel"):
        result = service.run(command, theirs)
        assert result.exit_code == 1
        assert result.stderr.startswith("Error: ") and "not found" in result.stderr
        assert len(result.stderr.splitlines()) == 1
    assert service.repo.get_job(theirs).cancel_requested is False


def test_show_prints_one_job(service: Service) -> None:
    job_id = service.job(chunks=[], outcome=INSTALL_FAILED)
    result = service.run("show", job_id)
    assert result.exit_code == 0, result.stderr
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert fields["Job"].strip() == job_id
    assert fields["Status"].strip() == "failed"
    assert fields["Result"].strip() == "✗ Job failed: dependency installation failed"
    assert fields["Reason"].strip() == "dependency installation failed"
    assert fields["Duration"].strip().endswith(" s")
    as_json = service.run("show", job_id, "--json")
    assert json.loads(as_json.stdout)["reason"] == "dependency installation failed"


def test_submit_and_wait_end_with_the_test_summary_and_failing_tests(service: Service,
                                                                      project: Path) -> None:
    report = TestReport(passed=40, failed=2, errors=0, skipped=1, duration_s=3.21,
                        failing=("tests/test_a.py::test_one", "tests/test_b.py::test_two"))
    thread = service.controller(["E   assert 3 == 2\n"],
                                JobOutcome(JobStatus.COMPLETED, 1, False, None, report=report))
    result = service.run("submit", "test")
    thread.join(10)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-4:] == [
        "✗ Tests failed (exit code 1)",
        "✗ 2 failed, 40 passed, 1 skipped in 3.2 s",
        "  tests/test_a.py::test_one",
        "  tests/test_b.py::test_two",
    ]
    job_id = service.repo.list_jobs(service.user_id)[0].id
    waited = service.run("wait", job_id)  # already finished: the same summary
    assert waited.stderr.splitlines()[-3:] == result.stderr.splitlines()[-3:]
    listed = json.loads(service.run("list", "--json").stdout)
    assert listed[0]["report"]["failed"] == 2
    assert "2 failed, 40 passed, 1 skipped" in service.run("list").stdout


def test_logs_and_show_of_a_pruned_job_say_the_output_was_removed(service: Service) -> None:
    job_id = service.job(chunks=["gone soon\n"], outcome=PASSED)
    assert service.repo.prune_jobs(utcnow() + timedelta(seconds=1)).jobs == 1
    logs = service.run("logs", job_id)
    assert logs.exit_code == 0 and logs.stdout == ""
    assert logs.stderr.startswith(f"The output of job {job_id} was removed ")
    assert "(retention)" in service.run("show", job_id).stdout


def test_list_pages_through_more_than_one_server_page(service: Service) -> None:
    for _ in range(1203):
        service.repo.create_job(service.user_id, b"zip", None)
    newest = [job.id for job in service.repo.list_jobs(service.user_id, limit=1100)]
    service.wire.requests.clear()
    result = service.run("list", "--json", "--limit", "1100")
    assert result.exit_code == 0, result.stderr
    assert [job["id"] for job in json.loads(result.stdout)] == newest
    pages = [r for r in service.wire.requests if r.url.path == "/jobs"]
    assert [(r.url.params["limit"], r.url.params["offset"]) for r in pages] == [
        ("500", "0"), ("500", "500"), ("100", "1000")]
    everything = service.run("list", "--limit", "5000")
    assert everything.exit_code == 0 and len(everything.stdout.splitlines()) == 2 + 1203


# ---------------------------------------------------------------------- job options (#11)
XML = '<?xml version="1.0"?><testsuites><testsuite tests="1"/></testsuites>'


def test_submit_passes_pytest_args_and_python_and_writes_the_junit_xml(
        service: Service, project: Path) -> None:
    target = project / "out.xml"
    thread = service.controller(["ok\n"], JobOutcome(JobStatus.COMPLETED, 0, True, None,
                                                     junit_xml=XML))
    result = service.run("submit", "test", "--python", "3.12", "--junit-xml", str(target),
                         "--", "-k", "slow and not db", "-x")
    thread.join(10)
    assert result.exit_code == 0, result.stderr
    job = service.repo.list_jobs(service.user_id)[0]
    assert job.pytest_args == ("-k", "slow and not db", "-x") and job.python_version == "3.12"
    assert target.read_text() == XML
    assert result.stderr.splitlines()[-1] == f"JUnit XML written to {target}"
    shown = service.run("show", job.id).stdout
    assert "Python:    3.12" in shown and "Arguments: -k 'slow and not db' -x" in shown


def test_no_report_is_one_line_and_the_exit_code_stays_the_jobs(service: Service,
                                                                project: Path) -> None:
    target = project / "none.xml"
    thread = service.controller([], INSTALL_FAILED)
    result = service.run("submit", "test", "--junit-xml", str(target))
    thread.join(10)
    assert result.exit_code == 1 and not target.exists()
    job_id = service.repo.list_jobs(service.user_id)[0].id
    assert result.stderr.splitlines()[-1] == (
        f"No JUnit XML written to {target}: job {job_id} has no JUnit report: the tests never "
        "ran (dependency installation failed)")
    passed = service.job(chunks=[], outcome=PASSED)  # passed, but no XML stored
    waited = service.run("wait", passed, "--junit-xml", str(target))
    assert waited.exit_code == 0 and "has no JUnit report" in waited.stderr


def test_refused_pytest_args_and_python_versions_are_one_line_before_upload(
        service: Service, project: Path) -> None:
    result = service.run("submit", "test", "--", "--junit-xml=x.xml")
    assert result.exit_code == 2 and "Uploading" not in result.stderr
    assert result.stderr.splitlines() == [
        "Error: pytest argument '--junit-xml=x.xml' is not allowed: --junit-xml would defeat "
        "the runner's test report or the job's layout"]
    result = service.run("submit", "test", "--python", "3.99")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (
        "Error: Python '3.99' is not available; choose one of 3.12 (default 3.12)")
    assert service.repo.list_jobs(service.user_id) == []
    bad_target = service.run("submit", "test", "--junit-xml", str(project / "no" / "x.xml"))
    assert bad_target.exit_code == 2 and "does not exist" in bad_target.stderr


def test_wait_shows_the_queue_position_as_it_changes(service: Service) -> None:
    for _ in range(2):
        service.job()
        time.sleep(0.002)
    job_id = service.job()  # the user's third: their first two are claimed before it

    def controller() -> None:
        fence = hold_lease(service.repo, "fake-controller")
        for _ in range(3):
            time.sleep(0.5)
            claimed = service.repo.claim_next_job(fence)
            assert claimed is not None
        assert claimed.id == job_id
        time.sleep(0.5)  # claimed, its container not started yet
        service.repo.mark_running(job_id, "c", utcnow(), fence=fence)
        service.repo.finish_job(job_id, PASSED, utcnow(), fence=fence)

    thread = threading.Thread(target=controller, daemon=True)
    thread.start()
    result = service.run("wait", job_id)
    thread.join(10)
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    queued = [line for line in lines if line.startswith("Queued:")]
    # One line each change: stderr is not a terminal here.
    assert queued == ["Queued: 2 jobs ahead", "Queued: 1 job ahead", "Queued: next in line",
                      "Queued: starting"], lines
    assert lines.index("Queued: starting") < lines.index("Status: running")
