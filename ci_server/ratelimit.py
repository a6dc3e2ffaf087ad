"""A per-address limit on failed authentications: a sliding one-minute window, in memory.

Each replica keeps its own window. That is enough to make guessing keys pointless (keys are
256-bit random) while keeping a typo'd key from locking anyone out for long.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 60.0
MAX_TRACKED_ADDRESSES = 10_000  # bounds memory when many addresses fail once each


class FailureLimiter:
    """Counts failures per client address; blocks an address that failed too often lately."""

    def __init__(self, max_failures_per_minute: int,
                 clock: Callable[[], float] = time.monotonic,
                 max_tracked: int = MAX_TRACKED_ADDRESSES) -> None:
        self._limit = max_failures_per_minute
        self._clock = clock
        self._max_tracked = max_tracked
        self._lock = threading.Lock()  # auth runs in the threadpool
        self._failures: dict[str, deque[float]] = {}

    @property
    def enabled(self) -> bool:
        return self._limit > 0

    def retry_after(self, address: str) -> int | None:
        """Whole seconds until `address` may try again, or None when it is not blocked."""
        if not self.enabled:
            return None
        with self._lock:
            now = self._clock()
            failures = self._failures.get(address)
            if failures is None:
                return None
            _expire(failures, now)
            if not failures:
                del self._failures[address]
                return None
            if len(failures) < self._limit:
                return None
            return max(1, math.ceil(failures[0] + WINDOW_S - now))

    def record_failure(self, address: str) -> None:
        """Remember one failed authentication from `address`."""
        if not self.enabled:
            return
        with self._lock:
            now = self._clock()
            failures = self._failures.get(address)
            if failures is None:
                if len(self._failures) >= self._max_tracked:
                    self._evict(now)
                # Only the latest `limit` failures decide whether the address is blocked.
                failures = self._failures[address] = deque(maxlen=self._limit)
            _expire(failures, now)
            failures.append(now)

    def tracked_addresses(self) -> int:
        """How many addresses are remembered (for tests and metrics)."""
        with self._lock:
            return len(self._failures)

    def _evict(self, now: float) -> None:
        for address in [a for a, f in self._failures.items() if not f or f[-1] <= now - WINDOW_S]:
            del self._failures[address]
        # Still full: forget the addresses tracked longest (dicts keep insertion order).
        while len(self._failures) >= self._max_tracked:
            del self._failures[next(iter(self._failures))]


def _expire(failures: deque[float], now: float) -> None:
    while failures and failures[0] <= now - WINDOW_S:
        failures.popleft()
