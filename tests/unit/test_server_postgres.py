"""The server over PostgreSQL: chosen by CI_DATABASE_URL, live events through LISTEN/NOTIFY,
and one line (never the password) when the database cannot be reached at start."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from ci_common.models import JobOutcome, JobStatus, OutputChunk, OutputStream, utcnow
from ci_persistence.postgres import PostgresRepository
from ci_server.app import build_app, open_or_exit
from tests.leases import hold_lease
from tests.postgres import free_port
from tests.unit.test_server_support import (
    BASE_SETTINGS,
    add_account,
    project_zip,
    read_stream,
    upload,
)

pytestmark = pytest.mark.timeout(60)
LINES = 40


def test_a_job_written_by_another_client_streams_live_and_in_order(postgres_url: str) -> None:
    settings = replace(BASE_SETTINGS, database_url=postgres_url, db_path="/nonexistent/ci.db")
    controller = PostgresRepository(postgres_url)  # the controller's own connections
    alice = add_account(controller, "alice@example.com")
    app = build_app(settings, lambda: open_or_exit(settings), owns_repository=True)
    try:
        with TestClient(app) as client:
            created = upload(client, alice, project_zip())
            assert created.status_code == 201, created.text
            job_id = created.json()["id"]

            def run_job() -> None:
                time.sleep(0.2)  # the stream below is open by then: the lines arrive live
                fence = hold_lease(controller, "ctl")
                assert controller.claim_next_job(fence) is not None
                controller.mark_running(job_id, "c", utcnow(), fence=fence)
                for n in range(LINES):
                    controller.append_output(job_id, [OutputChunk(OutputStream.STDOUT,
                                                                  f"line {n}\n")],
                                             n + 1, fence=fence)
                controller.finish_job(job_id, JobOutcome(JobStatus.COMPLETED, 0, True, None),
                                      utcnow(), fence=fence)

            feeder = threading.Thread(target=run_job, daemon=True)
            feeder.start()
            events = [event for event in read_stream(client, f"/jobs/{job_id}/events",
                                                     alice.headers) if event.event != "queue"]
            feeder.join(30)
    finally:
        controller.close()
    assert [e.seq for e in events] == list(range(1, LINES + 4))
    assert [e.json["text"] for e in events if e.event == "output"] == [
        f"line {n}\n" for n in range(LINES)]
    assert events[-1].event == "end" and events[-1].json["success"] is True


def test_an_unreachable_database_stops_uvicorn_with_one_line_and_exit_1() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CI_")}
    env["CI_DATABASE_URL"] = f"postgresql://ci:hunter2-pw@127.0.0.1:{port}/ci"
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "ci_server.app:app", "--host", "127.0.0.1",
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "rror" in line]
    assert len(errors) == 1 and errors[0].startswith(
        f"Error: cannot reach PostgreSQL at postgresql://ci@127.0.0.1:{port}/ci"), result.stderr
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
