"""A thread that sleeps until the SQLite files change (inotify), then calls back.

Every commit to a WAL database writes its `-wal` file (and a checkpoint writes the database
file), whichever process commits, so a watch on those two names wakes a waiter for every
commit of every process on this host, and for nothing else: reading the database writes
neither (readers touch only the `-shm` file, through a memory map, which inotify never sees).
The directory is watched rather than the files: the `-wal` file comes and goes.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

import inotify_simple

log = logging.getLogger(__name__)

_MASK = (inotify_simple.flags.MODIFY | inotify_simple.flags.CREATE
         | inotify_simple.flags.MOVED_TO)


class FileWatch:
    """Calls `on_change()` from its own thread whenever the database or its WAL is written."""

    def __init__(self, db_path: str, on_change: Callable[[], None]) -> None:
        path = os.path.abspath(db_path)
        base = os.path.basename(path)
        self._names = {base, f"{base}-wal"}
        self._on_change = on_change
        # Raises OSError when inotify is unavailable (not Linux, or out of watches/instances).
        self._inotify = inotify_simple.INotify()
        try:
            self._inotify.add_watch(os.path.dirname(path), _MASK)
            self._wake_r, self._wake_w = os.pipe()
        except BaseException:
            self._inotify.close()
            raise
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ci-sqlite-watch", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the thread and release the descriptors; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"x")
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._inotify.close()

    def _run(self) -> None:
        try:
            while not self._closed:
                readable, _, _ = select.select([self._inotify, self._wake_r], [], [])
                if self._closed or self._wake_r in readable:
                    return
                events = self._inotify.read(timeout=0)
                if any(event.name in self._names or event.mask & inotify_simple.flags.Q_OVERFLOW
                       for event in events):
                    self._on_change()
        except (OSError, ValueError) as exc:  # descriptors closed under us at shutdown
            if not self._closed:
                log.warning("database file watch stopped (%s); waiters re-check by themselves",
                            exc)
