"""The controller's lease on its id: one live controller per `CI_CONTROLLER_ID`.

At start the controller takes the lease (refused with `ControllerIdInUse` while another live
controller holds it), then a `LeaseKeeper` thread renews it every few seconds. A holder on this
same host whose process is gone (kill -9, a crash) is known dead at once, so a restart after a
crash need not wait for the lease to expire. A graceful stop releases the lease; containers are
left running for the restart, as before. Should the lease be lost anyway (this process stalled
longer than the lease and another controller took the id), the keeper stops the controller.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from importlib import metadata

from ci_common.models import ControllerLease, utcnow
from ci_common.repository import Repository
from ci_common.settings import Settings

log = logging.getLogger(__name__)

HEARTBEAT_MAX_S = 5.0  # renew at least this often, and at least four times per lease


def heartbeat_interval_s(lease_s: float) -> float:
    """How often to renew a lease of lease_s seconds."""
    return max(min(HEARTBEAT_MAX_S, lease_s / 4), 0.01)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def dead_holder_token(holder: ControllerLease | None, host: str, pid: int,
                      alive: Callable[[int], bool]) -> str | None:
    """The token of a holder known to be dead: on this host, and its process is gone."""
    if holder is None or holder.stopped or holder.host != host:
        return None
    if holder.pid == pid or not alive(holder.pid):
        return holder.token
    return None


def service_version() -> str:
    try:
        return metadata.version("ci-service")
    except metadata.PackageNotFoundError:
        return "unknown"


def acquire(settings: Settings, repository: Repository, *,
            alive: Callable[[int], bool] = process_alive) -> ControllerLease:
    """Take the lease on settings.controller_id or raise ControllerIdInUse."""
    host, pid = socket.gethostname(), os.getpid()
    holder = repository.get_lease(settings.controller_id)
    return repository.acquire_lease(
        settings.controller_id, host, pid, service_version(), utcnow(),
        settings.controller_lease_s,
        replace_token=dead_holder_token(holder, host, pid, alive))


class LeaseKeeper:
    """Renews a lease in its own thread until stopped; sets `lost` if it was taken."""

    def __init__(self, repository: Repository, lease: ControllerLease, lease_s: float,
                 on_lost: Callable[[], None]) -> None:
        self.lease = lease
        self.lost = threading.Event()
        self._repository = repository
        self._interval_s = heartbeat_interval_s(lease_s)
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lease")

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self._interval_s):
            try:
                held = self._repository.renew_lease(self.lease.id, self.lease.token, utcnow())
            except Exception as exc:  # the database may be busy or away for a while
                if not failing:
                    log.error("controller %s: heartbeat failed: %s", self.lease.id, exc)
                failing = True
                continue
            failing = False
            if not held:
                log.error("controller %s: the lease on this id was taken by another controller "
                          "(this one was silent longer than the lease); stopping",
                          self.lease.id)
                self.lost.set()
                self._on_lost()
                return

    def stop(self, release: bool) -> None:
        """Stop renewing; with release, mark the lease stopped so a restart takes it at once."""
        self._stop.set()
        self._thread.join(self._interval_s + 5)
        if release and not self.lost.is_set():
            try:
                self._repository.release_lease(self.lease.id, self.lease.token, utcnow())
            except Exception as exc:
                log.warning("controller %s: could not release the lease: %s", self.lease.id, exc)
