"""runner_entry.py, run for real with this machine's Python: unpacking, framing, exit codes."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import pytest

from ci_controller import runner_entry
from ci_controller.framing import Frame, FrameParser
from ci_controller.outcome import junit_from_phases

RUNNER = Path(runner_entry.__file__)


def make_zip(files: dict[str, bytes | str], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buffer.getvalue()


def project(test_body: str, requirements: str = "") -> dict[str, bytes | str]:
    return {
        "src/calc.py": "def add(a, b):\n    return a + b\n",
        "tests/test_calc.py": test_body,
        "requirements.txt": requirements,
    }


def run_runner(tmp_path: Path, archive: bytes, env: dict[str, str] | None = None,
               max_bytes: int = 10_000_000, max_entries: int = 100,
               extra: tuple[str, ...] = ()) -> tuple[int, list[Frame]]:
    (tmp_path / "source.zip").write_bytes(archive)
    result = subprocess.run(
        [sys.executable, str(RUNNER), "--archive", str(tmp_path / "source.zip"),
         "--workdir", str(tmp_path / "work"), "--max-bytes", str(max_bytes),
         "--max-entries", str(max_entries), *extra],
        capture_output=True, timeout=120, env={**os.environ, **(env or {})})
    parser = FrameParser()
    frames = parser.feed(result.stdout) + parser.finish()
    return result.returncode, frames


def output(frames: list[Frame], kind: str = "stdout") -> str:
    return "".join(f.text for f in frames if f.kind == kind)


def phases(frames: list[Frame]) -> list[str]:
    return [f.text for f in frames if f.kind == "phase"]


# ----------------------------------------------------------------------------- unpacking
def unpack(tmp_path: Path, archive: bytes, max_bytes: int = 10_000, max_entries: int = 10) -> int:
    path = tmp_path / "a.zip"
    path.write_bytes(archive)
    return runner_entry.unpack(str(path), str(tmp_path / "out"), max_bytes, max_entries)


def test_unpack_writes_files_and_counts_bytes(tmp_path: Path) -> None:
    written = unpack(tmp_path, make_zip({"src/a.py": "x = 1\n", "./b.txt": "bb", "d/": ""}))
    assert written == 8
    assert (tmp_path / "out" / "src" / "a.py").read_text() == "x = 1\n"
    assert (tmp_path / "out" / "b.txt").read_text() == "bb"


@pytest.mark.parametrize("name", ["../evil.py", "src/../../evil.py", "/etc/evil", "..\\evil",
                                  "C:/evil"])
def test_unpack_refuses_paths_out_of_the_project(tmp_path: Path, name: str) -> None:
    with pytest.raises(runner_entry.InvalidArchive):
        unpack(tmp_path, make_zip({name: "x"}))
    assert not (tmp_path / "evil.py").exists()


def test_unpack_refuses_symlinks(tmp_path: Path) -> None:
    with pytest.raises(runner_entry.InvalidArchive, match="symbolic link"):
        unpack(tmp_path, make_zip({"a.txt": "a"}, symlinks={"link": "/etc/passwd"}))


def test_unpack_caps_entries(tmp_path: Path) -> None:
    with pytest.raises(runner_entry.InvalidArchive, match="more than 3 entries"):
        unpack(tmp_path, make_zip({f"f{i}": "x" for i in range(4)}), max_entries=3)


def test_unpack_counts_real_bytes_not_header_sizes(tmp_path: Path) -> None:
    archive = bytearray(make_zip({"bomb.bin": b"\0" * 50_000}))
    # Lie in both headers: claim the entry is 10 bytes. The cap must still see 50 000.
    central = archive.rfind(b"PK\x01\x02")
    archive[central + 24:central + 28] = (10).to_bytes(4, "little")
    archive[22:26] = (10).to_bytes(4, "little")
    with pytest.raises(runner_entry.InvalidArchive):
        unpack(tmp_path, bytes(archive), max_bytes=20_000)
    with pytest.raises(runner_entry.InvalidArchive, match="more than 20000 bytes"):
        unpack(tmp_path, make_zip({"bomb.bin": b"\0" * 50_000}), max_bytes=20_000)


def test_unpack_refuses_non_zip(tmp_path: Path) -> None:
    with pytest.raises(runner_entry.InvalidArchive, match="not a zip file"):
        unpack(tmp_path, b"this is not a zip")


# ----------------------------------------------------------------------------- whole runs
def test_passing_project(tmp_path: Path) -> None:
    code, frames = run_runner(tmp_path, make_zip(project(
        "from calc import add\n\ndef test_add():\n    assert add(1, 2) == 3\n")))
    assert code == 0
    said = [p for p in phases(frames) if not p.startswith("junit ")]
    assert [p.split(" {")[0] for p in said] == [
        "install started", "tests started", "report", "tests exited 0"]
    report = json.loads(said[2][len("report "):])
    assert (report["passed"], report["failed"], report["failing"]) == (1, 0, [])
    assert report["slowest"][0][0] == "tests/test_calc.py::test_add"
    assert "test_add PASSED" in output(frames)
    assert [f.number for f in frames] == list(range(1, len(frames) + 1))


def test_pytest_arguments_are_separate_argv_entries_and_the_xml_comes_back(
        tmp_path: Path) -> None:
    tests = "".join(f"def test_{name}():\n    pass\n\n" for name in
                    ("fast", "slow_a", "slow_b", "x_slow_quoted"))
    args = ("-k", "slow and not quoted", "-q")  # one argument with spaces: not split
    code, frames = run_runner(tmp_path, make_zip(project(tests)),
                              extra=("--pytest-args", json.dumps(args)))
    assert code == 0
    assert "$ python -m pytest -v -p no:cacheprovider -k 'slow and not quoted' -q" in \
        output(frames)
    xml = junit_from_phases(phases(frames))
    assert xml is not None
    root = ElementTree.fromstring(xml)
    ran = sorted(case.get("name") for case in root.iter("testcase"))
    assert ran == ["test_slow_a", "test_slow_b"]


def test_a_long_report_travels_in_pieces_and_a_too_long_one_not_at_all(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_entry, "JUNIT_PIECE", 100)
    xml = "<testsuites>" + "é" * 1000 + "</testsuites>"
    (tmp_path / "junit.xml").write_text(xml, encoding="utf-8")
    read, write = os.pipe()
    emitter = runner_entry.Emitter(write)
    runner_entry.send_junit(str(tmp_path / "junit.xml"), emitter)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        frames = FrameParser().feed(pipe.read())
    assert len(frames) == 11
    assert junit_from_phases([f.text for f in frames]) == xml
    assert junit_from_phases(["junit <a>", "junit </a>", "tests exited 0"]) == "<a></a>"
    assert junit_from_phases(["report {}"]) is None
    monkeypatch.setattr(runner_entry, "MAX_JUNIT_KEPT", 100)
    read, write = os.pipe()
    runner_entry.send_junit(str(tmp_path / "junit.xml"), runner_entry.Emitter(write))
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        assert pipe.read() == b""


def test_failing_project_exits_with_pytest_code(tmp_path: Path) -> None:
    code, frames = run_runner(tmp_path, make_zip(project("def test_x():\n    assert False\n")))
    assert code == 1
    assert phases(frames)[-1] == "tests exited 1"


def test_binary_output_and_a_megabyte_line(tmp_path: Path) -> None:
    # pytest shows a failing test's captured output in its report, 1 MB line included.
    body = ("import sys\n\ndef test_noise():\n"
            "    sys.stdout.buffer.write(b'bad \\xff\\xfe \\xc3 bytes\\n')\n"
            "    sys.stdout.write('z' * 1_000_000)\n"
            "    sys.stdout.write('\\nend\\n')\n"
            "    assert False\n")
    code, frames = run_runner(tmp_path, make_zip(project(body)))
    text = output(frames)
    assert code == 1
    assert all(f.framed for f in frames)
    assert "bad \ufffd\ufffd \ufffd bytes" in text
    assert "z" * 1_000_000 in text
    assert all(len(f.text) <= runner_entry.READ_CHUNK for f in frames)


def test_install_failure(tmp_path: Path) -> None:
    code, frames = run_runner(tmp_path, make_zip(project("def test_x():\n    pass\n",
                                                         "no-such-package-xyz==1.0\n")),
                              env={"PIP_NO_INDEX": "1"})
    assert code == runner_entry.EXIT_INSTALL_FAILED
    assert phases(frames)[-1].startswith("install failed (exit ")
    assert "no-such-package-xyz" in output(frames) + output(frames, "stderr")
    # The step the error belongs to is announced first, as in a CI log.
    assert output(frames).startswith("$ python -m pip install --no-input --progress-bar off "
                                     "-r requirements.txt\n")


def test_each_step_is_announced_before_its_output(tmp_path: Path) -> None:
    code, frames = run_runner(tmp_path, make_zip(project("def test_x():\n    pass\n")))
    text = output(frames)
    assert code == 0
    announced = [line for line in text.splitlines() if line.startswith("$ ")]
    assert announced[-1] == "$ python -m pytest -v -p no:cacheprovider"
    assert text.index(announced[-1]) < text.index("test session starts")


def test_invalid_archive(tmp_path: Path) -> None:
    code, frames = run_runner(tmp_path, make_zip({"../x.py": "x", "requirements.txt": ""}))
    assert code == runner_entry.EXIT_INVALID_ARCHIVE
    assert phases(frames) == ["invalid archive: path escapes the project: ../x.py"]


def test_missing_requirements_is_an_invalid_archive(tmp_path: Path) -> None:
    code, frames = run_runner(tmp_path, make_zip({"src/a.py": "", "tests/t.py": ""}))
    assert code == runner_entry.EXIT_INVALID_ARCHIVE
    assert phases(frames) == ["invalid archive: requirements.txt is missing"]


def test_sigterm_stops_the_tests_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "source.zip").write_bytes(make_zip(project(
        "import time\n\ndef test_slow():\n    print('sleeping', flush=True)\n"
        "    time.sleep(60)\n")))
    proc = subprocess.Popen(
        [sys.executable, str(RUNNER), "--archive", str(tmp_path / "source.zip"), "--workdir",
         str(tmp_path / "work"), "--max-bytes", "1000000", "--max-entries", "100"],
        stdout=subprocess.PIPE)
    assert proc.stdout is not None
    parser = FrameParser()
    seen: list[Frame] = []
    try:
        deadline = time.monotonic() + 30
        while "tests started" not in phases(seen) and time.monotonic() < deadline:
            seen += parser.feed(os.read(proc.stdout.fileno(), 65536))
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        assert time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    seen += parser.feed(rest) + parser.finish()
    assert proc.returncode == runner_entry.EXIT_TERMINATED
    assert phases(seen)[-1] == "terminated"


# --------------------------------------------------------------------------- the test report
def test_report_counts_failures_errors_and_skips_with_pytest_node_ids(tmp_path: Path) -> None:
    body = ("import pytest\n\n"
            "def test_ok():\n    pass\n\n"
            "def test_bad():\n    assert 1 == 2\n\n"
            "def test_plain():\n    pass\n\n"
            "@pytest.mark.skip(reason='not today')\n"
            "def test_skipped():\n    pass\n\n"
            "@pytest.fixture\n"
            "def broken():\n    raise RuntimeError('setup')\n\n"
            "def test_setup_error(broken):\n    pass\n\n"
            "class TestGroup:\n"
            "    def test_in_class(self):\n        assert False\n")
    code, frames = run_runner(tmp_path, make_zip(project(body)))
    assert code == 1
    report = json.loads(next(p for p in phases(frames) if p.startswith("report "))[7:])
    assert {k: report[k] for k in ("passed", "failed", "errors", "skipped")} == {
        "passed": 2, "failed": 2, "errors": 1, "skipped": 1}
    assert report["failing"] == ["tests/test_calc.py::test_bad",
                                 "tests/test_calc.py::test_setup_error",
                                 "tests/test_calc.py::TestGroup::test_in_class"]
    assert len(report["slowest"]) == 5 and report["duration_s"] >= 0


def test_no_report_when_the_tests_never_ran_or_the_xml_is_broken(tmp_path: Path) -> None:
    code, frames = run_runner(tmp_path, make_zip({"tests/test_x.py": "def test_x(): pass\n"}))
    assert phases(frames) == ["invalid archive: requirements.txt is missing"]
    broken = tmp_path / "junit.xml"
    broken.write_text("<testsuites><testsuite><testcase name='a'")
    assert runner_entry.summarize_junit(str(broken), str(tmp_path)) is None
    assert runner_entry.summarize_junit(str(tmp_path / "missing.xml"), str(tmp_path)) is None


def test_a_node_id_falls_back_to_the_classname_when_no_file_matches(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "test_m.py").write_text("")
    assert runner_entry.node_id("pkg.test_m.TestA", "test_b", str(tmp_path)) == (
        "pkg/test_m.py::TestA::test_b")
    assert runner_entry.node_id("gone.mod", "test_c", str(tmp_path)) == "gone.mod::test_c"
    assert runner_entry.node_id("", "tests/test_x.py", str(tmp_path)) == "tests/test_x.py"
