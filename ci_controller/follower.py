"""Stream one container's output into the repository: a reader thread and a writer thread.

The reader turns raw chunks into frames as they arrive and queues the ones not yet stored.
The writer blocks for the first queued frame, then takes whatever else is queued and stores it
in ONE `append_output` call. An idle job's line is therefore written within milliseconds, and
under heavy output the batches grow by themselves while the previous transaction runs: no timer,
no transaction per line.

Frames are numbered without gaps, so frames that never arrive (the engine's json-file log
rotated them away before they were read: the runner bounds its rate so this should not happen,
but a stalled controller can still fall behind) leave a marker line in the log, never a silent
hole.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from ci_common.errors import LeaseLost
from ci_common.models import Fence
from ci_common.repository import Repository
from ci_controller.framing import (
    KIND_PHASE,
    KIND_STDOUT,
    Frame,
    FrameParser,
    is_new,
    lost_text,
    skipped_bytes,
    to_chunks,
)
from ci_controller.outcome import is_final_phase
from ci_controller.runtime import OutputFollow

log = logging.getLogger(__name__)

MAX_BATCH_CHARS = 1024 * 1024  # keeps one transaction short even when a backlog piled up
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0
JOIN_S = 10.0  # how long stopping waits for the writer to store what it holds

_END = object()  # queued after the last frame


class OutputFollower:
    """Follows one job's container output and stores new frames; see the module docstring."""

    def __init__(self, job_id: str, stream: OutputFollow, repository: Repository,
                 stored_through: int, keep_bytes: int | None, *, fence: Fence,
                 on_verdict: Callable[[], None] | None = None,
                 on_lease_lost: Callable[[], None] | None = None) -> None:
        self.job_id = job_id
        self._fence = fence
        self._on_lease_lost = on_lease_lost
        self._lease_lost: LeaseLost | None = None  # a write was refused: the job is not ours
        self._stream = stream
        self._repository = repository
        self._stored_through = stored_through  # frames up to here are already stored
        self._cursor = stored_through
        self._last_framed: int | None = None  # the number of the last frame read
        self._keep_bytes = keep_bytes
        self._queue: queue.SimpleQueue[Frame | object] = queue.SimpleQueue()
        self._phases: list[str] = []
        self._lock = threading.Lock()
        self._settled = threading.Event()  # the stream ended or the runner's last word arrived
        self.verdict_seen = threading.Event()  # the runner's last word arrived (not just EOF)
        self._on_verdict = on_verdict
        self._abandon = threading.Event()  # stop retrying failed writes
        self._store_failing = False  # the last write failed (the database is away or busy)
        self._detaching = threading.Event()  # the output goes on; we just stop following it
        self._stopping = threading.Event()  # finish() or detach() was called
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"read-{job_id[:8]}")
        self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                        name=f"write-{job_id[:8]}")
        self.frames_read = 0
        self.bytes_read = 0
        self.writes = 0

    @property
    def phases(self) -> list[str]:
        """The runner's phase frames seen so far (all of them, stored or not)."""
        with self._lock:
            return list(self._phases)

    @property
    def cursor(self) -> int:
        """The last frame number stored by this follower (or before it)."""
        return self._cursor

    def raise_lease_lost(self) -> None:
        """Raise the LeaseLost a write met, if one did (the job is someone else's now)."""
        if self._lease_lost is not None:
            raise self._lease_lost

    def start(self) -> None:
        with self._lock:
            self._reader.start()
            self._writer.start()

    # ------------------------------------------------------------------ reader
    def _read(self) -> None:
        parser = FrameParser()
        try:
            for chunk in self._stream:
                self.bytes_read += len(chunk)
                self._handle(parser.feed(chunk))
            if parser.pending:
                # A stream cut by a lost engine ends as quietly as a finished one, possibly in
                # mid-line: only the supervisor knows (finish: the output is over; detach: the
                # next controller re-reads that frame whole), so wait for its word.
                self._settled.set()
                self._stopping.wait()
            # A partial last line is the end of the output only when the output is over; on a
            # detach it is the start of a frame the next controller reads whole.
            if not self._detaching.is_set():
                self._handle(parser.finish())
        except Exception:
            log.exception("job %s: reading the container output failed", self.job_id)
        finally:
            self._queue.put(_END)
            self._settled.set()

    def _handle(self, frames: list[Frame]) -> None:
        for frame in frames:
            self.frames_read += 1
            if frame.framed:
                self._note_gap(frame.number)
            if frame.kind == KIND_PHASE:
                with self._lock:
                    self._phases.append(frame.text)
                if is_final_phase(frame.text):
                    self.verdict_seen.set()
                    self._settled.set()
                    if self._on_verdict is not None:
                        self._on_verdict()
            elif is_new(frame, self._stored_through):
                self._queue.put(frame)

    def _note_gap(self, number: int) -> None:
        """Queue a marker for frames missing before this one (and not stored before)."""
        first_missing = max((self._last_framed or 0) + 1, self._stored_through + 1)
        self._last_framed = number
        if number > first_missing:
            log.warning("job %s: output frames %d-%d are missing from the engine's log",
                        self.job_id, first_missing, number - 1)
            self._queue.put(Frame(number - 1, KIND_STDOUT, lost_text(number - first_missing),
                                  framed=False))

    # ------------------------------------------------------------------ writer
    def _write_loop(self) -> None:
        done = False
        while not done:
            first = self._queue.get()
            batch: list[Frame] = []
            size = 0
            item: Frame | object = first
            while True:
                if item is _END:
                    done = True
                    break
                assert isinstance(item, Frame)
                batch.append(item)
                size += len(item.text)
                if size >= MAX_BATCH_CHARS:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch and self._lease_lost is None:
                self._store(batch)

    def _store(self, frames: list[Frame]) -> None:
        chunks = to_chunks(frames)
        skipped = skipped_bytes(frames)
        cursor = max(self._cursor, max(frame.number for frame in frames))
        delay = RETRY_FIRST_S
        while True:
            try:
                self._repository.append_output(self.job_id, chunks, log_cursor=cursor,
                                               fence=self._fence, keep_bytes=self._keep_bytes,
                                               skipped_bytes=skipped)
                self._cursor = cursor
                self.writes += 1
                if self._store_failing:
                    log.info("job %s: storing output works again", self.job_id)
                    self._store_failing = False
                return
            except LeaseLost as exc:
                # Refused for good: retrying cannot help, and whoever owns the job now stores
                # its output. Later frames are dropped the same way.
                log.warning("job %s: output write refused: %s", self.job_id, exc.message)
                self._lease_lost = exc
                if self._on_lease_lost is not None:
                    self._on_lease_lost()
                return
            except Exception as exc:
                if self._abandon.is_set():
                    log.error("job %s: gave up storing %d output frames: %s", self.job_id,
                              len(frames), exc)
                    return
                if not self._store_failing:
                    log.warning("job %s: storing output failed (%s); retrying", self.job_id, exc)
                self._store_failing = True
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    # ------------------------------------------------------------------ stopping
    def finish(self, drain_s: float) -> None:
        """After the container exited: read what is left (until drain_s of silence), stop."""
        # A followed log stream may outlive its container: stop at the runner's last word, or
        # after a short drain when there is none (the container was killed). An adopted
        # container's whole log is re-read from the start, which can take longer than one
        # drain: keep going while bytes still arrive.
        seen = self.bytes_read
        while not self._settled.wait(drain_s) and self.bytes_read != seen:
            seen = self.bytes_read
        self._stop()

    def detach(self) -> None:
        """Stop following now (warm stop); what was read is still stored."""
        self._detaching.set()
        self._stop()

    def _stop(self) -> None:
        self._stopping.set()
        self._stream.close()
        with self._lock:
            if self._reader.ident is None:  # never started: nothing to wait for
                return
        self._reader.join(JOIN_S)
        self._writer.join(JOIN_S)
        # The output is over but not all stored because the database is away (a PostgreSQL
        # restart): wait for it, however long. The job cannot be finished without it either,
        # and giving up here would lose those lines for good. A warm stop need not wait: the
        # next controller re-reads what is not stored from the container.
        while self._writer.is_alive() and self._store_failing and \
                not self._detaching.is_set():
            self._writer.join(JOIN_S)
        if self._writer.is_alive():
            self._abandon.set()
            self._writer.join(JOIN_S)
