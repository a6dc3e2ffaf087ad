"""Hostile uploads against a real server (straight HTTP), and the runner's own checks in Docker.

The server is started with small limits (CI_MAX_UPLOAD=2MB, CI_MAX_UNPACKED=5MB,
CI_MAX_ENTRIES=100) and TMPDIR pointed at a directory the test owns. Every hostile upload must
get a 4xx with a one-line detail, create no job, leave no file behind, and leave the server
healthy; afterwards a normal job still passes.

Archives the server would refuse are also put straight into the database
(SqliteRepository.create_job, bypassing the server) to prove that the runner inside the
container refuses them too, with the reason "invalid archive: …". Containers are removed when
their job ends, so "nothing was written outside the work dir" is proven on a container of our
own, built from the very spec, runner and archive the controller uses, with `docker diff`: it
lists every path the container changed in its filesystem, which is exactly the evidence needed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import struct
import time
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
import pytest

from ci_common.settings import Settings
from ci_controller.docker_runtime import DockerRuntime
from ci_controller.spec import ARCHIVE_PATH, RUNNER_PATH, WORK_DIR, job_container_spec
from ci_controller.supervisor import runner_source
from ci_persistence.sqlite import SqliteRepository
from tests.e2e.harness import Deployment, Process, User, remove_labelled_containers

pytestmark = pytest.mark.docker

MAX_UPLOAD = 2 * 1024**2
MAX_UNPACKED = 5 * 1024**2
MAX_ENTRIES = 100
LIMITS_ENV = {"CI_MAX_UPLOAD": "2MB", "CI_MAX_UNPACKED": "5MB", "CI_MAX_ENTRIES": "100"}
JOB_DEADLINE_S = 90.0
HTTP_TIMEOUT_S = 20.0
BOUNDARY = b"hostile-boundary-7c1f"

PROJECT: list[tuple[str, bytes]] = [
    ("requirements.txt", b"pytest\n"),
    ("src/calc.py", b"def add(a, b):\n    return a + b\n"),
    ("tests/test_calc.py",
     b"from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"),
]


# ------------------------------------------------------------------------- archives
Entry = tuple[str | zipfile.ZipInfo, bytes]


def make_zip(entries: Sequence[Entry], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def symlink(name: str, target: str) -> Entry:
    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16  # S_IFLNK: what `zip --symlinks` records
    return info, target.encode()


def lying_sizes(data: bytes, claimed: int) -> bytes:
    """The zip with every member's uncompressed size in its headers replaced by `claimed`."""
    patched = bytearray(data)
    # local file header: signature PK\3\4, uncompressed size at offset 22
    pos = patched.find(b"PK\x03\x04")
    while pos != -1:
        struct.pack_into("<I", patched, pos + 22, claimed)
        pos = patched.find(b"PK\x03\x04", pos + 4)
    # central directory header: signature PK\1\2, uncompressed size at offset 24
    pos = patched.find(b"PK\x01\x02")
    while pos != -1:
        struct.pack_into("<I", patched, pos + 24, claimed)
        pos = patched.find(b"PK\x01\x02", pos + 4)
    return bytes(patched)


def corrupt_member(data: bytes) -> bytes:
    """Flip bytes inside the first member's compressed data; the directory stays intact."""
    patched = bytearray(data)
    name_len, extra_len = struct.unpack_from("<HH", patched, 26)
    start = 30 + name_len + extra_len
    for i in range(start, start + 8):
        patched[i] ^= 0xFF
    return bytes(patched)


def bomb_entries() -> list[Entry]:
    """6 MB of zeros in one member: about 6 KB compressed, over the 5 MB unpacked limit."""
    return [*PROJECT, ("src/bomb.bin", b"\0" * (6 * 1024**2))]


GOOD = make_zip(PROJECT)
ZIP_SLIP = make_zip([*PROJECT, ("../../etc/evil", b"pwned\n")])
ABSOLUTE = make_zip([*PROJECT, ("/etc/evil", b"pwned\n")])
# A link to /etc, then a file "through" it: an extractor that made the link writes /etc/evil.
SYMLINK_DIR = make_zip([*PROJECT, symlink("src/etc", "/etc"), ("src/etc/evil", b"pwned\n")])
BOMB = make_zip(bomb_entries())
MANY_ENTRIES = make_zip([*PROJECT, *((f"src/m{i}.txt", b"") for i in range(150))])


# ------------------------------------------------------------------------- raw HTTP
@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def detail(self) -> str:
        """The JSON detail of the application's answers; the text of the HTTP layer's."""
        if self.headers.get("content-type", "").startswith("application/json"):
            return str(json.loads(self.body)["detail"])
        return self.body.decode("utf-8", "replace")


def multipart_body(archive: bytes, field: str = "archive") -> bytes:
    return (b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=\"" + field.encode()
            + b"\"; filename=\"project.zip\"\r\nContent-Type: application/zip\r\n\r\n"
            + archive + b"\r\n--" + BOUNDARY + b"--\r\n")


def raw_post(server: Process, key: str, framing: bytes, body: bytes) -> RawResponse:
    """POST /jobs over a bare socket, with framing headers that may lie; read one response."""
    host, port = server.url.removeprefix("http://").split(":")  # type: ignore[union-attr]
    head = (b"POST /jobs HTTP/1.1\r\nHost: " + host.encode() + b"\r\nAuthorization: Bearer "
            + key.encode() + b"\r\nContent-Type: multipart/form-data; boundary=" + BOUNDARY
            + b"\r\n" + framing + b"\r\n")
    with socket.create_connection((host, int(port)), timeout=HTTP_TIMEOUT_S) as sock:
        sock.sendall(head)
        # The server may stop reading once it has answered; the answer is what counts.
        with contextlib.suppress(OSError):
            sock.sendall(body)
        return read_response(sock)


def read_response(sock: socket.socket) -> RawResponse:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return RawResponse(status=int(lines[0].split()[1]), headers=headers, body=rest[:length])


def open_files_under(pid: int, directory: Path) -> list[str]:
    """Files the process holds open inside `directory`, unnamed temporary files included."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith(str(directory)):
            found.append(target)
    return found


# ------------------------------------------------------------------------- deployment
@dataclass
class Env:
    deployment: Deployment
    server: Process
    user: User
    user_id: str
    tmpdir: Path
    workdir_files: set[str]  # the server's working directory: database and logs only

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.user.api_key}"}

    def post(self, archive: bytes, **kwargs: object) -> httpx.Response:
        return httpx.post(f"{self.server.url}/jobs", headers=self.headers,
                          files={"archive": ("project.zip", archive, "application/zip")},
                          timeout=HTTP_TIMEOUT_S, **kwargs)  # type: ignore[arg-type]

    def job_count(self) -> int:
        response = httpx.get(f"{self.server.url}/jobs", headers=self.headers,
                             timeout=HTTP_TIMEOUT_S)
        assert response.status_code == 200, response.text
        return int(response.json()["total"])

    def wait_job(self, job_id: str) -> dict[str, object]:
        deadline = time.monotonic() + JOB_DEADLINE_S
        while True:
            response = httpx.get(f"{self.server.url}/jobs/{job_id}", headers=self.headers,
                                 timeout=HTTP_TIMEOUT_S)
            assert response.status_code == 200, response.text
            job: dict[str, object] = response.json()
            if job["status"] in ("completed", "failed", "cancelled"):
                return job
            assert time.monotonic() < deadline, f"job {job_id} stuck: {job}"
            time.sleep(0.1)

    def end_event(self, job_id: str) -> dict[str, object]:
        """The END event of a finished job, read from its SSE stream."""
        with httpx.stream("GET", f"{self.server.url}/jobs/{job_id}/events",
                          headers=self.headers, timeout=HTTP_TIMEOUT_S) as response:
            assert response.status_code == 200
            kind = ""
            for line in response.iter_lines():
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and kind == "end":
                    end: dict[str, object] = json.loads(line.split(":", 1)[1])
                    return end
        raise AssertionError(f"no end event for job {job_id}")

    def assert_untouched(self, jobs_before: int) -> None:
        """Healthy, no job created, no new file anywhere, no traceback in the server's log."""
        assert httpx.get(f"{self.server.url}/health", timeout=HTTP_TIMEOUT_S).status_code == 200
        assert self.job_count() == jobs_before
        assert list(self.tmpdir.iterdir()) == []
        assert {p.name for p in self.deployment.workdir.iterdir()} == self.workdir_files
        assert open_files_under(self.server.popen.pid, self.tmpdir) == []
        assert "Traceback" not in self.server.log()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, runner_image: str,
        ca_bundle: str | None) -> Iterator[Env]:
    """One server and controller with small archive limits, shared by this module's tests."""
    workdir = tmp_path_factory.mktemp("hostile")
    tmpdir = workdir / "server-tmp"
    tmpdir.mkdir()
    dep = Deployment(workdir=workdir, runner_image=runner_image, ca_bundle=ca_bundle,
                     extra_env=dict(LIMITS_ENV))
    try:
        dep.start_controller()
        server = dep.start_server(TMPDIR=str(tmpdir))
        user = dep.create_user()
        found = json.loads(dep.admin("user", "get", "--email", user.email, "--json").stdout)
        yield Env(deployment=dep, server=server, user=user, user_id=found[0]["id"],
                  tmpdir=tmpdir, workdir_files={p.name for p in workdir.iterdir()})
    finally:
        dep.close()


# ------------------------------------------------------------------------- the server refuses
# (archive, expected status, a phrase the one-line detail must contain)
REFUSED: dict[str, tuple[bytes, int, str]] = {
    "not-a-zip": (b"just some text, not a zip\n" * 10, 400, "not a zip file"),
    "empty": (b"", 400, "the upload is empty"),
    "truncated": (GOOD[: len(GOOD) // 2], 400, "not a zip file"),
    "corrupt-member": (corrupt_member(GOOD), 400, "invalid archive: "),
    "dot-dot": (make_zip([*PROJECT, ("../evil.py", b"x")]), 400, "escapes the project"),
    "dot-dot-deep": (ZIP_SLIP, 400, "'../../etc/evil' escapes the project"),
    "dot-dot-inside": (make_zip([*PROJECT, ("src/../../evil", b"x")]), 400, "escapes the project"),
    "absolute": (ABSOLUTE, 400, "'/etc/evil' is an absolute path"),
    "drive-letter": (make_zip([*PROJECT, ("C:/evil", b"x")]), 400, "is an absolute path"),
    "backslash": (make_zip([*PROJECT, ("..\\evil", b"x")]), 400, "contains a backslash"),
    "symlink": (make_zip([*PROJECT, symlink("src/passwd", "/etc/passwd")]), 400,
                "'src/passwd' is a symbolic link"),
    "symlink-dir": (SYMLINK_DIR, 400, "'src/etc' is a symbolic link"),
    "bomb": (BOMB, 400, "unpacks to more than 5.0 MB"),
    "bomb-spread": (make_zip([*PROJECT, *((f"src/z{i}", b"\0" * 64 * 1024) for i in range(90))]),
                    400, "unpacks to more than 5.0 MB"),
    # Headers claiming 1 KB: the server measures by decompressing, so the lie cannot pass.
    "bomb-lying-headers": (lying_sizes(make_zip(bomb_entries()), 1024), 400, "invalid archive: "),
    "too-many-entries": (MANY_ENTRIES, 400, "153 entries, over the limit of 100"),
    "huge-number-of-entries": (
        make_zip([*PROJECT, *((f"src/{i}", b"") for i in range(15_000))], zipfile.ZIP_STORED),
        400, "15003 entries, over the limit of 100"),
    "over-size-limit": (os.urandom(3 * 1024**2), 413, "over the 2.0 MB limit"),
    "missing-src": (make_zip([e for e in PROJECT if not e[0].startswith("src/")]), 400,
                    "project is missing src/"),
    "missing-tests": (make_zip([e for e in PROJECT if not e[0].startswith("tests/")]), 400,
                      "project is missing tests/"),
    "missing-requirements": (make_zip(PROJECT[1:]), 400, "project is missing requirements.txt"),
    "missing-everything": (make_zip([("README.md", b"hi\n")]), 400,
                           "project is missing src/, tests/ and requirements.txt"),
    "zipped-folder": (make_zip([(f"project/{name}", data) for name, data in PROJECT]), 400,
                      "everything is under 'project/'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_hostile_archive_is_refused_with_one_line(env: Env, case: str) -> None:
    archive, status, phrase = REFUSED[case]
    before = env.job_count()
    response = env.post(archive)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert phrase in detail and "\n" not in detail, detail
    env.assert_untouched(before)


def test_over_the_limit_with_a_chunked_body_and_no_length(env: Env) -> None:
    before = env.job_count()
    body = multipart_body(os.urandom(3 * 1024**2))

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start:start + 64 * 1024]

    # A generator body makes httpx send Transfer-Encoding: chunked without Content-Length.
    response = httpx.post(f"{env.server.url}/jobs", content=chunks(), timeout=HTTP_TIMEOUT_S,
                          headers={**env.headers, "Content-Type":
                                   "multipart/form-data; boundary=" + BOUNDARY.decode()})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413, response.text
    assert response.json()["detail"] == "archive is over the 2.0 MB limit"
    env.assert_untouched(before)


# framing headers → the answers that refuse it: (status, phrase in the detail). Where two are
# listed, the first is the application's and the second uvicorn's HTTP parser's: with httptools
# (llhttp, a dependency) the parser refuses some framings before the application sees them,
# with h11 (uvicorn's fallback where httptools is missing) the application does.
PARSER_REFUSAL = (400, "Invalid HTTP request received.")
LYING_FRAMING: dict[str, tuple[bytes, tuple[tuple[int, str], ...]]] = {
    # Declares far more than the limit: refused before a byte of the body is read.
    "length-says-huge": (b"Content-Length: 100000000\r\n", ((413, "over the 2.0 MB limit"),)),
    # Declares a little, sends 3 MB: the server reads what was declared, a cut-off form; the
    # rest of the bytes are no request either.
    "length-says-small": (b"Content-Length: 1000\r\n",
                          ((400, "missing file field 'archive'"), PARSER_REFUSAL)),
    # Chunked, 3 MB, with a Content-Length that understates it: h11 lets chunked win (RFC 9112
    # 6.1); llhttp refuses both headers together, as the RFC also allows (request smuggling).
    "chunked-with-lying-length": (b"Content-Length: 1000\r\nTransfer-Encoding: chunked\r\n",
                                  ((413, "over the 2.0 MB limit"), PARSER_REFUSAL)),
    "chunked-no-length": (b"Transfer-Encoding: chunked\r\n", ((413, "over the 2.0 MB limit"),)),
}


def chunked(data: bytes, size: int = 64 * 1024) -> bytes:
    out = [b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size])
           for i in range(0, len(data), size)]
    return b"".join(out) + b"0\r\n\r\n"


@pytest.mark.parametrize("case", list(LYING_FRAMING))
def test_over_the_limit_whatever_the_framing_claims(env: Env, case: str) -> None:
    framing, refusals = LYING_FRAMING[case]
    before = env.job_count()
    body = multipart_body(make_zip([*PROJECT, ("src/blob.bin", os.urandom(3 * 1024**2))],
                                   zipfile.ZIP_STORED))
    if b"chunked" in framing:
        body = chunked(body)
    response = raw_post(env.server, env.user.api_key, framing, body)
    detail = response.detail()
    assert any(response.status == status and phrase in detail for status, phrase in refusals), \
        (response.status, response.body[:200])
    assert "\n" not in detail, detail
    env.assert_untouched(before)


def test_other_malformed_submissions_get_one_line(env: Env) -> None:
    before = env.job_count()
    url = f"{env.server.url}/jobs"
    answers = {
        "raw zip body": httpx.post(url, content=GOOD, timeout=HTTP_TIMEOUT_S,
                                   headers={**env.headers, "Content-Type": "application/zip"}),
        "wrong field": httpx.post(url, files={"file": ("p.zip", GOOD)}, headers=env.headers,
                                  timeout=HTTP_TIMEOUT_S),
        "two files": httpx.post(url, files=[("archive", ("a.zip", GOOD)),
                                            ("archive", ("b.zip", GOOD))],
                                headers=env.headers, timeout=HTTP_TIMEOUT_S),
        "bad timeout": env.post(GOOD, data={"timeout": "-5"}),
    }
    for name, response in answers.items():
        assert response.status_code == 400, (name, response.text)
        detail = response.json()["detail"]
        assert detail and "\n" not in detail, (name, detail)
    env.assert_untouched(before)


def test_an_upload_is_never_spooled_to_disk(env: Env) -> None:
    """Mid-upload, the server holds no file in TMPDIR (Starlette spools parts over 1 MB)."""
    before = env.job_count()
    # 1.5 MB of incompressible bytes: a valid project, over Starlette's spool threshold.
    archive = make_zip([*PROJECT, ("src/blob.bin", os.urandom(1536 * 1024))], zipfile.ZIP_STORED)
    body = multipart_body(archive)
    host, port = env.server.url.removeprefix("http://").split(":")  # type: ignore[union-attr]
    with socket.create_connection((host, int(port)), timeout=HTTP_TIMEOUT_S) as sock:
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: " + host.encode() + b"\r\nAuthorization: "
                     b"Bearer " + env.user.api_key.encode() + b"\r\nContent-Type: multipart/"
                     b"form-data; boundary=" + BOUNDARY + b"\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body[:-64])
        time.sleep(1.0)  # let the server take in everything sent so far
        spooled = open_files_under(env.server.popen.pid, env.tmpdir)
        sock.sendall(body[-64:])
        response = read_response(sock)
    assert spooled == [], f"upload written to disk: {spooled}"
    assert response.status == 201, response.body
    assert list(env.tmpdir.iterdir()) == []
    job_id = json.loads(response.body)["id"]
    assert env.job_count() == before + 1
    repository = SqliteRepository(str(env.deployment.db_path))
    try:
        assert repository.get_archive(job_id) == archive  # stored intact, from memory
    finally:
        repository.close()
    # Running it proves nothing more (the next test runs a normal job): free the slot.
    cancel = httpx.post(f"{env.server.url}/jobs/{job_id}/cancel", headers=env.headers,
                        timeout=HTTP_TIMEOUT_S)
    assert cancel.status_code == 202, cancel.text


def test_after_every_hostile_upload_a_normal_job_still_passes(env: Env) -> None:
    for archive, status, _phrase in REFUSED.values():
        assert env.post(archive).status_code == status
    for framing, refusals in LYING_FRAMING.values():
        body = multipart_body(os.urandom(3 * 1024**2))
        assert raw_post(env.server, env.user.api_key, framing,
                        chunked(body) if b"chunked" in framing else body).status in {
            status for status, _phrase in refusals}
    assert env.server.popen.poll() is None
    response = env.post(GOOD)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    job = env.wait_job(job_id)
    assert (job["status"], job["success"], job["exit_code"]) == ("completed", True, 0), job
    assert env.end_event(job_id)["success"] is True
    assert list(env.tmpdir.iterdir()) == []
    assert "Traceback" not in env.server.log()


# ------------------------------------------------------------------------- the runner refuses
# Archives the server would refuse, put into the database directly: the controller's runner must
# refuse them on its own, within the limits the controller was given (CI_MAX_UNPACKED=5MB,
# CI_MAX_ENTRIES=100), with a reason that names the problem.
RUNNER_REFUSES: dict[str, tuple[bytes, str]] = {
    "zip-slip": (ZIP_SLIP, "invalid archive: path escapes the project: ../../etc/evil"),
    "absolute": (ABSOLUTE, "invalid archive: absolute path in archive: /etc/evil"),
    "symlink-dir": (SYMLINK_DIR, "invalid archive: symbolic link in archive: src/etc"),
    "bomb": (BOMB, f"invalid archive: unpacks to more than {MAX_UNPACKED} bytes"),
    "too-many-entries": (MANY_ENTRIES, f"invalid archive: more than {MAX_ENTRIES} entries"),
    "not-a-zip": (b"not a zip at all", "invalid archive: not a zip file (File is not a zip file)"),
    "missing-requirements": (make_zip(PROJECT[1:]),
                             "invalid archive: requirements.txt is missing"),
}


def test_runner_refuses_archives_that_bypassed_the_server(env: Env) -> None:
    repository = SqliteRepository(str(env.deployment.db_path))
    try:
        jobs = {case: repository.create_job(env.user_id, archive, None).id
                for case, (archive, _reason) in RUNNER_REFUSES.items()}
    finally:
        repository.close()
    results = {case: env.wait_job(job_id) for case, job_id in jobs.items()}
    reasons = {case: (job["status"], job["reason"]) for case, job in results.items()}
    assert reasons == {case: ("failed", reason) for case, (_a, reason) in RUNNER_REFUSES.items()}
    # The user sees the same reason at the end of the job's event stream.
    end = env.end_event(jobs["zip-slip"])
    assert (end["status"], end["reason"]) == ("failed", RUNNER_REFUSES["zip-slip"][1])


# Paths the engine itself adds to every container started with init=True.
ENGINE_PATHS = {"/usr", "/usr/sbin", "/usr/sbin/docker-init"}


@pytest.mark.parametrize("case", ["zip-slip", "absolute", "symlink-dir", "bomb"])
def test_runner_writes_nothing_outside_its_work_dir(runner_image: str, case: str) -> None:
    """Run the runner as the controller would, then list every path the container changed."""
    tag = uuid.uuid4().hex[:10]
    settings = Settings.from_env({}, runner_image=runner_image, controller_id=f"test-diff-{tag}",
                                 container_prefix=f"ci_test_diff_{tag}_",
                                 max_unpacked_bytes=MAX_UNPACKED, max_archive_entries=MAX_ENTRIES)
    runtime = DockerRuntime()
    client = docker.from_env()
    try:
        container_id = runtime.create(job_container_spec(settings, f"diff-{tag}", tag))
        runtime.put_files(container_id, {RUNNER_PATH: runner_source(),
                                         ARCHIVE_PATH: RUNNER_REFUSES[case][0]})
        runtime.start(container_id)
        assert runtime.wait(container_id, 60), "runner did not finish"
        logs = client.api.logs(container_id).decode()
        changed = {entry["Path"] for entry in client.api.diff(container_id)}
    finally:
        client.close()
        remove_labelled_containers(f"ci.installation_id={tag}")
    assert RUNNER_REFUSES[case][1] in logs, logs
    # Control: the entries before the bad one were extracted, so the diff does see extraction.
    assert f"{WORK_DIR}/requirements.txt" in changed, changed
    outside = {path for path in changed if path != "/ci" and not path.startswith("/ci/")}
    assert outside <= ENGINE_PATHS, f"written outside the work dir: {outside - ENGINE_PATHS}"
    assert not any("evil" in path for path in changed), changed
