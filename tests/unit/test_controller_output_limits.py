"""Output beyond the log limit: the runner drops what the cap would, the controller says so."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ci_common.errors import DatabaseUnavailable
from ci_common.models import EventKind, JobEvent
from ci_controller import follower as follower_module
from ci_controller import runner_entry
from ci_controller.follower import OutputFollower
from ci_controller.framing import (
    KIND_SKIPPED,
    FrameParser,
    skipped_bytes,
    skipped_text,
    to_chunks,
)
from ci_persistence.memory import InMemoryRepository
from tests.leases import hold_lease, owner_fence

RUNNER = Path(runner_entry.__file__)


# ----------------------------------------------------------------------------- runner
def test_outbox_keeps_the_last_limit_bytes_and_every_phase() -> None:
    outbox = runner_entry.Outbox(limit=100)
    outbox.put("stdout", "a" * 60)
    outbox.put("phase", "tests started")
    for letter in "bcde":
        outbox.put("stdout", letter * 60)
    outbox.close()
    # a, b and c went (180 bytes); d and e (120 bytes, at least the limit) are kept
    assert outbox.take(60) == [("phase", "tests started"), ("skipped", "180"),
                               ("stdout", "d" * 60)]
    assert outbox.take(1000) == [("stdout", "e" * 60)]
    assert outbox.take(1000) is None


def test_outbox_counts_utf8_bytes_and_keeps_a_piece_larger_than_the_limit() -> None:
    outbox = runner_entry.Outbox(limit=10)
    outbox.put("stdout", "é" * 10)  # 20 bytes
    outbox.put("stderr", "x" * 50)
    outbox.close()
    assert outbox.take(1) == [("skipped", "20"), ("stderr", "x" * 50)]  # one piece at least
    assert outbox.take(1) is None


def flood_archive(megabytes: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("requirements.txt", "")
        archive.writestr("pytest.ini", "[pytest]\naddopts = -s\n")
        archive.writestr("tests/test_flood.py", (
            "import os\n"
            "def test_flood():\n"
            "    block = (b'x' * 1023 + b'\\n') * 1024\n"
            f"    for _ in range({megabytes}):\n"
            "        os.write(1, block)\n"
            "    os.write(1, b'FLOOD DONE\\n')\n"))
    return buffer.getvalue()


def test_runner_with_a_log_limit_drops_the_middle_of_a_flood(tmp_path: Path) -> None:
    (tmp_path / "source.zip").write_bytes(flood_archive(64))
    limit = 256 * 1024
    result = subprocess.run(
        [sys.executable, str(RUNNER), "--archive", str(tmp_path / "source.zip"),
         "--workdir", str(tmp_path / "work"), "--max-bytes", "10000000", "--max-entries", "100",
         "--log-limit", str(limit)],
        capture_output=True, timeout=120)
    assert result.returncode == 0
    parser = FrameParser()
    frames = parser.feed(result.stdout) + parser.finish()
    assert all(frame.framed for frame in frames)
    assert [frame.number for frame in frames] == list(range(1, len(frames) + 1))
    assert len(result.stdout) < 32 * 1024**2  # most of the 64 MB never left the container
    last_skip = max(i for i, frame in enumerate(frames) if frame.kind == KIND_SKIPPED)
    tail = "".join(frame.text for frame in frames[last_skip:] if frame.kind == "stdout")
    assert len(tail.encode()) >= limit  # at least what the controller keeps, without a gap
    assert "FLOOD DONE\nPASSED" in tail and " 1 passed in " in tail
    written = sum(len(frame.text.encode()) for frame in frames if frame.kind == "stdout")
    assert written + skipped_bytes(frames) >= 64 * 1024**2
    assert frames[-1].text == "tests exited 0"


# ----------------------------------------------------------------------------- controller
def test_skipped_frames_become_a_marker_line() -> None:
    frames = FrameParser().feed(b'[1,"stdout","a\\n"]\n[2,"skipped","5000000"]\n'
                                b'[3,"skipped","oops"]\n[4,"stdout","b\\n"]\n')
    assert [(f.kind, f.framed) for f in frames] == [
        ("stdout", True), ("skipped", True), ("stdout", False), ("stdout", True)]
    assert skipped_bytes(frames) == 5_000_000
    chunks = [chunk.text for chunk in to_chunks(frames)]
    assert chunks[:2] == ["a\n", skipped_text(5_000_000)]  # an event of its own
    assert "4.8 MB of output skipped here" in chunks[1]


class ListFollow:
    """Raw output chunks given up front, as a finished container's log."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        pass


def frame_lines(*frames: tuple[int, str, str]) -> bytes:
    return b"".join(json.dumps(list(frame)).encode() + b"\n" for frame in frames)


def follow(repo: InMemoryRepository, job_id: str, data: bytes, stored_through: int = 0,
           keep_bytes: int | None = None) -> list[str]:
    follower = OutputFollower(job_id, ListFollow([data]), repo, stored_through, keep_bytes,
                              fence=owner_fence(repo, job_id))
    follower.start()
    follower.finish(5.0)
    return [e.text for e in repo.list_events(job_id) if e.kind is EventKind.OUTPUT]


def running_job(repo: InMemoryRepository) -> str:
    user = repo.create_user("A", "a@example.com")
    job = repo.create_job(user.id, b"zip", None)
    assert repo.claim_next_job(hold_lease(repo, "ctl")) is not None
    return repo.mark_running(job.id, "container-1", datetime.now(UTC),
                             fence=owner_fence(repo, job.id)).id


def test_frames_missing_from_the_engine_log_leave_a_marker() -> None:
    repo = InMemoryRepository()
    job_id = running_job(repo)
    texts = follow(repo, job_id, frame_lines(
        (1, "stdout", "one\n"), (2, "stdout", "two\n"), (6, "stdout", "six\n"),
        (7, "phase", "tests exited 0")))
    joined = "".join(texts)
    assert joined.startswith("one\ntwo\n[ci] … output lost here: 3 output frame(s) missing")
    assert joined.endswith("six\n")
    assert repo.get_job(job_id).log_cursor == 6


def test_an_adopted_log_is_not_a_gap_but_a_rotated_one_is() -> None:
    repo = InMemoryRepository()
    job_id = running_job(repo)
    replayed = frame_lines((1, "stdout", "one\n"), (2, "stdout", "two\n"), (3, "stdout", "3\n"))
    assert follow(repo, job_id, replayed, stored_through=2) == ["3\n"]
    rotated = frame_lines((9, "stdout", "nine\n"))
    joined = "".join(follow(repo, job_id, rotated, stored_through=3))
    assert joined.startswith("3\n[ci] … output lost here: 5 output frame(s)")
    assert joined.endswith("…\nnine\n")


def test_skipped_bytes_reach_the_marker_of_the_log_cap() -> None:
    repo = InMemoryRepository()
    job_id = running_job(repo)
    data = frame_lines((1, "stdout", "h" * 99 + "\n"), (2, "skipped", "1000000"),
                       *[(n, "stdout", "t" * 99 + "\n") for n in range(3, 6)])
    texts = follow(repo, job_id, data, keep_bytes=300)
    assert texts[0].startswith("[ci] … ") and "of earlier output dropped" in texts[0]
    assert "".join(texts[1:]) == ("t" * 99 + "\n") * 3
    job = repo.get_job(job_id)
    assert job.dropped_bytes == 1_000_000 + 100 + len(skipped_text(1_000_000).encode())
    assert repo.get_job(job_id).output_bytes == 300


class AwayDatabase(InMemoryRepository):
    """A repository whose output writes fail as a database that is away would, until told."""

    def __init__(self) -> None:
        super().__init__()
        self.away = False
        self.refused = 0

    def append_output(self, *args: Any, **kwargs: Any) -> list[JobEvent]:
        if self.away:
            self.refused += 1
            raise DatabaseUnavailable("cannot reach PostgreSQL at postgresql://ci@db/ci")
        return super().append_output(*args, **kwargs)


def test_output_the_database_cannot_take_yet_is_kept_until_it_can(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The container is done but the database is away for longer than the follower's stop
    waits: the follower holds on (it used to give the lines up), and stores them once."""
    monkeypatch.setattr(follower_module, "JOIN_S", 0.1)
    repo = AwayDatabase()
    job_id = running_job(repo)
    repo.away = True
    threading.Timer(1.0, lambda: setattr(repo, "away", False)).start()
    texts = follow(repo, job_id, frame_lines(
        (1, "stdout", "one\n"), (2, "stdout", "two\n"), (3, "phase", "tests exited 0")))
    assert repo.refused > 1
    assert texts == ["one\ntwo\n"]
    assert repo.get_job(job_id).log_cursor == 2
