"""The controller's lease decisions and keeper, against the in-memory repository."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import replace
from datetime import timedelta

import pytest

from ci_common.errors import ControllerIdInUse
from ci_common.models import utcnow
from ci_common.settings import Settings
from ci_controller import lease
from ci_controller.lease import LeaseKeeper, dead_holder_token, heartbeat_interval_s
from ci_persistence.memory import InMemoryRepository

SETTINGS = Settings(controller_id="ctl-x", controller_lease_s=60.0)


def test_heartbeat_interval_is_a_few_seconds_and_several_per_lease() -> None:
    assert heartbeat_interval_s(60) == 5.0
    assert heartbeat_interval_s(2) == 0.5


def test_a_holder_is_known_dead_only_on_this_host_with_its_process_gone() -> None:
    repo = InMemoryRepository()
    holder = repo.acquire_lease("ctl-x", "here", 42, "v", utcnow(), 60)
    assert dead_holder_token(holder, "here", 7, alive=lambda pid: False) == holder.token
    assert dead_holder_token(holder, "here", 7, alive=lambda pid: True) is None
    assert dead_holder_token(holder, "elsewhere", 7, alive=lambda pid: False) is None
    assert dead_holder_token(None, "here", 7, alive=lambda pid: False) is None


def test_restart_after_a_crash_takes_the_id_at_once_but_a_live_holder_refuses() -> None:
    repo = InMemoryRepository()
    host = socket.gethostname()
    gone = repo.acquire_lease("ctl-x", host, 999_999_999, "v", utcnow(), 60)  # no such pid
    taken = lease.acquire(SETTINGS, repo)
    assert taken.token != gone.token and taken.pid == os.getpid()
    repo2 = InMemoryRepository()
    repo2.acquire_lease("ctl-x", host, os.getppid(), "v", utcnow(), 60)  # alive: our parent
    with pytest.raises(ControllerIdInUse):
        lease.acquire(SETTINGS, repo2)


def test_keeper_renews_releases_and_reports_a_lost_lease() -> None:
    repo = InMemoryRepository()
    held = lease.acquire(replace(SETTINGS, controller_lease_s=0.2), repo)
    keeper = LeaseKeeper(repo, held, 0.2, on_lost=lambda: None)
    keeper.start()
    first_beat = held.heartbeat_at
    threading.Event().wait(0.3)
    current = repo.get_lease("ctl-x")
    assert current is not None and current.heartbeat_at > first_beat
    keeper.stop(release=True)
    released = repo.get_lease("ctl-x")
    assert released is not None and released.stopped

    held = lease.acquire(replace(SETTINGS, controller_lease_s=0.2), repo)
    lost = threading.Event()
    keeper = LeaseKeeper(repo, held, 0.2, on_lost=lost.set)
    keeper.start()
    # Another controller takes the id after this one's heartbeat went stale.
    repo.acquire_lease("ctl-x", "other-host", 1, "v", utcnow() + timedelta(seconds=5), 0.2)
    assert lost.wait(2) and keeper.lost.is_set()
    keeper.stop(release=True)
    still = repo.get_lease("ctl-x")
    assert still is not None and still.host == "other-host" and not still.stopped
