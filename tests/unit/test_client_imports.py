"""`ci` starts quickly: each command imports only what it needs (issue #10).

Structural, not timed: each check runs the command in a fresh interpreter and looks at
`sys.modules`, so it fails the moment someone adds a module-level import of httpx or pydantic
(or anything that pulls them in) on a command's way, whatever the machine's speed. The network
is a canned server on a raw socket, which records what was loaded when each request arrived
and answers as the server would (an event stream included, so `ci submit test` and `ci wait`
follow a job over plain http as they do for real).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Never needed to start a command: the HTTP client used for event streams and https, the
# server's models, the database drivers, and httpx's optional command-line extras.
HEAVY = ("httpx", "httpx_sse", "httpcore", "h11", "anyio", "certifi", "pydantic",
         "pydantic_core", "sqlite3", "psycopg", "rich", "pygments", "ci_common.wire",
         "ci_common.models", "ci_common.settings", "ci_server", "ci_persistence")
# What `ci --help` needs even less: no network, no packing.
NOT_FOR_HELP = ("http.client", "ssl", "zipfile", "pathspec", "ci_client.client",
                "ci_client.transport", "ci_client.packing")
# What `ci` never loads to talk plain http: the IDNA codec (an ASCII host name is resolved as
# bytes). ssl comes with http.client, which imports it for HTTPSConnection.
NOT_OVER_PLAIN_HTTP = ("encodings.idna", "stringprep", "unicodedata")
# What a command that does not pack a project never loads.
NOT_FOR_READING = ("zipfile", "pathspec", "ci_client.packing")

JOB = "1222e26a-e4d2-4dda-8ffa-ba333257cc1b"
JOB_JSON = {"id": JOB, "status": "completed", "success": True, "exit_code": 0, "reason": None,
            "created_at": "2025-10-12T19:30:00Z", "start_time": "2025-10-12T19:30:01Z",
            "end_time": "2025-10-12T19:30:05Z", "report": None, "pruned_at": None}
ANSWERS = {  # (method, path) → the server's JSON answer
    ("GET", "/jobs"): {"jobs": [JOB_JSON], "total": 1, "limit": 50, "offset": 0},
    ("GET", f"/jobs/{JOB}"): JOB_JSON,
    ("POST", "/jobs"): {"id": JOB, "status": "queued"},
    ("POST", f"/jobs/{JOB}/cancel"): JOB_JSON,  # already finished: nothing to wait for
    ("GET", f"/jobs/{JOB}/events"): (  # text: an event stream, the job from start to end
        'id: 0\n\nid: 1\nevent: status\ndata: {"status": "running"}\n\n'
        'id: 2\nevent: output\ndata: {"stream": "stdout", "text": "1 passed\\n"}\n\n'
        'id: 3\nevent: end\ndata: {"status": "completed", "exit_code": 0, "success": true}\n\n'),
}

# A fresh interpreter that serves canned answers on a raw socket (nothing the client could
# share: no http.server, no email parsing) and records, when each request arrives, which of the
# watched modules the command had loaded by then.
PROBE = """
import json, socket, sys, threading

watched = {watched!r}
answers = {answers!r}
report = {{"sent": []}}

def loaded():
    # Not counted: None (an import blocked on purpose) and modules registered by LazyLoader
    # whose code has not run yet (their class is importlib.util's _LazyModule until then).
    return sorted(name for name, module in list(sys.modules.items())
                  if module is not None and type(module).__name__ != "_LazyModule"
                  and any(name == w or name.startswith(w + ".") for w in watched))

def serve(listener):
    while True:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\\r\\n\\r\\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\\r\\n\\r\\n")
            lines = head.decode().split("\\r\\n")
            method, target, _ = lines[0].split(" ")
            path = target.split("?")[0]
            report["sent"].append([method, path, loaded()])
            size = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    size = int(value)
            while len(body) < size:
                body += conn.recv(65536)
            answer = answers[method + " " + path]
            kind = b"text/event-stream" if isinstance(answer, str) else b"application/json"
            answer = (answer if isinstance(answer, str) else json.dumps(answer)).encode()
            conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Type: %s\\r\\n"
                         b"Connection: close\\r\\nContent-Length: %d\\r\\n\\r\\n"
                         % (kind, len(answer)) + answer)

listener = socket.create_server(("127.0.0.1", 0))
threading.Thread(target=serve, args=(listener,), daemon=True).start()
sys.argv = ["ci", *{argv!r}, "--server", "http://127.0.0.1:%d" % listener.getsockname()[1]]
from ci_client.cli import main
try:
    main()
except SystemExit as exc:
    report["exit"] = exc.code
report["at_exit"] = loaded()
print(json.dumps(report))
"""


def run_ci(argv: list[str], cwd: Path, watched: tuple[str, ...]) -> dict[str, object]:
    """Run `ci ARGV` in a fresh interpreter; what of `watched` it loaded, and when."""
    code = PROBE.format(watched=watched, argv=argv,
                        answers={f"{m} {p}": body for (m, p), body in ANSWERS.items()})
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "CI_API_KEY": "ci_testkey"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=cwd, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout.splitlines()[-1])
    return report


def test_ci_help_loads_no_network_nor_models(tmp_path: Path) -> None:
    report = run_ci(["--help"], tmp_path, HEAVY + NOT_FOR_HELP)
    assert (report["exit"], report["sent"], report["at_exit"]) == (0, [], [])


@pytest.mark.parametrize("command", [["list", "--help"], ["submit", "test", "--help"]])
def test_subcommand_help_loads_no_network_nor_models(tmp_path: Path, command: list[str]) -> None:
    report = run_ci(command, tmp_path, HEAVY + NOT_FOR_HELP)
    assert (report["exit"], report["at_exit"]) == (0, [])


@pytest.mark.parametrize("command", [["list"], ["list", "--json"], ["show", JOB],
                                     ["show", JOB, "--json"], ["cancel", JOB]])
def test_plain_commands_load_no_httpx_nor_pydantic(tmp_path: Path, command: list[str]) -> None:
    report = run_ci(command, tmp_path, HEAVY + NOT_FOR_READING + NOT_OVER_PLAIN_HTTP)
    assert report["exit"] == 0
    assert [loaded for _, _, loaded in report["sent"]] == [[]]
    assert report["at_exit"] == []


def test_submit_sends_its_upload_before_loading_httpx_or_pydantic(tmp_path: Path) -> None:
    for item in ("src", "tests"):
        (tmp_path / item).mkdir()
    (tmp_path / "requirements.txt").write_text("pytest\n")
    (tmp_path / "tests" / "test_ok.py").write_text("def test_ok():\n    assert True\n")
    report = run_ci(["submit", "test", "--async"], tmp_path, HEAVY)
    assert report["sent"] == [["POST", "/jobs", []]]
    assert (report["exit"], report["at_exit"]) == (0, [])


def test_submit_and_wait_follow_the_job_without_httpx(tmp_path: Path) -> None:
    # The event stream of a plain-http server goes through http.client as the requests do:
    # the whole command, upload to the job's end, never loads httpx (issue #10: its import
    # is a good part of a submit's CPU when several run at once).
    for item in ("src", "tests"):
        (tmp_path / item).mkdir()
    (tmp_path / "requirements.txt").write_text("pytest\n")
    (tmp_path / "tests" / "test_ok.py").write_text("def test_ok():\n    assert True\n")
    report = run_ci(["submit", "test"], tmp_path, HEAVY + NOT_OVER_PLAIN_HTTP)
    assert [(method, path) for method, path, _ in report["sent"]] == [
        ("POST", "/jobs"), ("GET", f"/jobs/{JOB}/events")]
    assert (report["exit"], report["at_exit"]) == (0, [])
    report = run_ci(["wait", JOB, "--all"], tmp_path, HEAVY + NOT_OVER_PLAIN_HTTP)
    assert [(method, path) for method, path, _ in report["sent"]] == [
        ("GET", f"/jobs/{JOB}"), ("GET", f"/jobs/{JOB}/events")]
    assert (report["exit"], report["at_exit"]) == (0, [])


def test_the_probe_sees_what_a_command_loads(tmp_path: Path) -> None:
    # Without this, an empty list above could mean a probe that sees nothing.
    report = run_ci(["list"], tmp_path, ("ci_client.transport", "http.client"))
    assert report["sent"] == [["GET", "/jobs", ["ci_client.transport", "http.client"]]]
