"""Waiting for the change token to move, without polling: the part every backend shares.

A backend bumps a `ChangeSignal` whenever something *may* have changed (a commit of this
process, an inotify event on the SQLite files, a NOTIFY on the PostgreSQL socket). Waiters
sleep on its condition and, when woken, read the backend's real token: a hint that turns out
to be nothing costs one cheap token read, and no hint costs nothing at all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# Even with a working notification, a waiter reads the token by itself this often: a lost
# hint (an inotify queue overflow, a notification path nobody thought of) then costs at most
# this much latency, and an idle process one cheap read per period.
SAFETY_RECHECK_S = 2.0


class ChangeSignal:
    """A generation counter with a condition: `bump()` wakes every `wait()`er."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0
        self._interrupts = 0
        self._seen: dict[int, int] = {}  # thread id → the interrupt count it last saw

    def bump(self) -> None:
        """Something may have changed: wake the waiters so they look."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def interrupt(self) -> None:
        """Make every wait in progress return now, changed or not (and the next wait of a
        thread that was not waiting: its interrupt is not lost)."""
        with self._cond:
            self._interrupts += 1
            self._cond.notify_all()

    def wait_for_change(self, read_token: Callable[[], int], seen: int | None, timeout_s: float,
                        recheck_s: Callable[[], float] = lambda: SAFETY_RECHECK_S,
                        settle_s: tuple[float, ...] = ()) -> int:
        """Until read_token() differs from `seen` (or timeout_s, or an interrupt); its value.

        `recheck_s()` bounds each sleep (a backend may need to look sooner for a while).
        `settle_s`: after a hint that changed nothing, look again after these delays before
        sleeping long: a hint may come just before the change it announces becomes visible
        (SQLite writes the WAL, then publishes the commit in shared memory, which makes no
        inotify event).
        """
        with self._cond:  # before reading the token: a bump after this is never missed
            generation, interrupts = self._generation, self._interrupts
            # An interrupt this thread has not seen yet (it came while the thread was between
            # two waits, e.g. just before a stop) ends this wait at once.
            thread = threading.get_ident()
            missed = self._seen.get(thread, interrupts) != interrupts
            self._seen[thread] = interrupts
        token = read_token()
        if seen is None or token != seen or missed:
            return token
        deadline = time.monotonic() + max(timeout_s, 0.0)
        settling: list[float] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return token
            step = min(left, settling.pop(0) if settling else recheck_s())
            with self._cond:
                if self._generation == generation and self._interrupts == interrupts:
                    self._cond.wait(step)  # a spurious wake-up just costs a token read
                hinted = self._generation != generation
                interrupted = self._interrupts != interrupts
                generation = self._generation
                self._seen[thread] = self._interrupts
            token = read_token()
            if token != seen or interrupted:
                return token
            if hinted:
                settling = list(settle_s)
