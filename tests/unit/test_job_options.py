"""Issue #11's decisions: which pytest arguments pass, Python versions and images, the queue
order, the queue line, and why a job has no JUnit XML; and the endpoints that use them."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from ci_client.queue_line import QueueLine, queue_text, wants_color
from ci_common.errors import InvalidInput
from ci_common.models import JobOutcome, JobStatus, QueueSnapshot, WaitingJob, utcnow
from ci_common.pytest_args import MAX_ARGS, check_pytest_args, pytest_args_from_json
from ci_common.python_images import image_version, parse_python_images
from ci_common.settings import Settings
from ci_controller.spec import job_container_spec
from ci_persistence.policy import jobs_ahead
from ci_server.junit import missing_junit_reason
from tests.leases import owner_fence
from tests.unit.test_server_support import Server, make_server, project_zip, server, upload

__all__ = ["server"]


# ----------------------------------------------------------------------------- pytest args
@pytest.mark.parametrize("args", [
    ["-k", "slow and not db", "-x"], ["-vv", "--tb=short", "-m", "not net"],
    ["tests/test_a.py::test_p"], ["-kpc"],  # -k's value "pc", not -p and -c
    ["-o", "python_files=check_*.py"], ["--override-ini=log_cli=true"], ["-W", "error"],
    ["--", "-p"],  # after `--` pytest reads paths only
    ["--lf", "--maxfail=2", "-n", "0", "--durations=5"],
])
def test_ordinary_pytest_arguments_pass_as_given(args: list[str]) -> None:
    assert check_pytest_args(args) == tuple(args)


@pytest.mark.parametrize(("args", "named"), [
    (["--junitxml=x.xml"], "--junitxml"), (["--junit-xml", "x.xml"], "--junit-xml"),
    (["--junit"], "--junit"),  # argparse would expand the prefix
    (["--junit-prefix=x"], "--junit-prefix"), (["-p", "no:junitxml"], "'-p'"),
    (["-pno:junitxml"], "-pno"), (["-xvp", "no:junitxml"], "-xvp"), (["-c", "other.ini"], "'-c'"),
    (["--config-file=o.ini"], "--config-file"), (["--rootdir=/"], "--rootdir"),
    (["--basetemp=/ci"], "--basetemp"), (["-o", "addopts=-p no:junitxml"], "addopts"),
    (["-oaddopts=x"], "addopts"), (["--override-ini", "junit_family=xunit1"], "junit_family"),
    (["@more-args.txt"], "@more"), (["-k", "x\x00"], "NUL"),
])
def test_arguments_that_defeat_the_report_are_refused_in_one_line(args: list[str],
                                                                  named: str) -> None:
    with pytest.raises(InvalidInput) as error:
        check_pytest_args(args)
    assert named in error.value.message and "\n" not in error.value.message


def test_pytest_arguments_are_bounded_and_travel_as_a_json_list() -> None:
    with pytest.raises(InvalidInput, match=f"at most {MAX_ARGS}"):
        check_pytest_args(["-v"] * (MAX_ARGS + 1))
    with pytest.raises(InvalidInput, match="4096 characters"):
        check_pytest_args(["-k", "x" * 4096])
    assert pytest_args_from_json('["-k", "a b"]') == ("-k", "a b")
    assert pytest_args_from_json(None) == pytest_args_from_json("") == ()
    for bad in ('"-k"', "[1]", "{", '{"a": 1}'):
        with pytest.raises(InvalidInput, match="JSON list of strings"):
            pytest_args_from_json(bad)


# ----------------------------------------------------------------------------- Python images
def test_python_images_first_is_default_and_unknown_versions_list_the_choices() -> None:
    images = parse_python_images(" 3.11=ci-runner:debian-bookworm-py3.11, "
                                 "3.13=ci-runner:debian-trixie-py3.13", "ignored")
    assert images.versions == ("3.11", "3.13") and images.default == "3.11"
    assert images.resolve(None) == images.resolve(" ") == "3.11"
    assert images.resolve("3.13") == "3.13"
    assert images.image_for("3.13") == "ci-runner:debian-trixie-py3.13"
    assert images.image_for(None) == "ci-runner:debian-bookworm-py3.11"  # an older job
    with pytest.raises(InvalidInput) as error:
        images.resolve("3.12")
    assert error.value.message == ("Python '3.12' is not available; choose one of 3.11, 3.13 "
                                   "(default 3.11)")
    with pytest.raises(InvalidInput, match="no runner image for Python 3.9"):
        images.image_for("3.9")


def test_without_the_setting_the_runner_image_alone_under_the_version_it_names() -> None:
    assert image_version("python:3.12-slim") == "3.12"
    assert image_version("ci-runner:debian-bookworm-py3.11") == "3.11"
    assert image_version("registry.example/team/python3.13:latest") == "3.13"
    assert image_version("my-runner:latest") == "default"
    images = parse_python_images(None, "ci-runner:debian-bookworm-py3.11")
    assert images.images == (("3.11", "ci-runner:debian-bookworm-py3.11"),)


@pytest.mark.parametrize("text", ["3.11", "3.11=", "three=img", "3.11=a,3.11=b", " , "])
def test_a_malformed_setting_stops_the_service_naming_it(text: str) -> None:
    with pytest.raises(InvalidInput, match="CI_PYTHON_IMAGES"):
        Settings.from_env({"CI_PYTHON_IMAGES": text})


def test_the_container_runs_the_jobs_python_image_and_its_pytest_args() -> None:
    settings = Settings(python_images_text="3.11=img-311,3.13=img-313")
    spec = job_container_spec(settings, "job", "inst", pytest_args=["-k", "a b"],
                              python_version="3.13")
    assert spec.image == "img-313"
    assert spec.command[-2:] == ("--pytest-args", '["-k", "a b"]')  # one argv entry, no shell
    plain = job_container_spec(settings, "job", "inst")
    assert plain.image == "img-311" and "--pytest-args" not in plain.command


# ----------------------------------------------------------------------------- queue order
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def waiting(job_id: str, user: str, second: int) -> WaitingJob:
    return WaitingJob(job_id, user, T0 + timedelta(seconds=second))


def test_jobs_ahead_replays_fair_claims_between_users() -> None:
    snapshot = QueueSnapshot(
        waiting=(waiting("a1", "ann", 1), waiting("a2", "ann", 2), waiting("a3", "ann", 3),
                 waiting("b1", "bob", 4), waiting("c1", "cy", 5), waiting("b2", "bob", 6)),
        busy={"ann": 1})
    # bob and cy have nothing running: they go before ann's second waiting job.
    assert jobs_ahead(snapshot) == {"b1": 0, "c1": 1, "a1": 2, "b2": 3, "a2": 4, "a3": 5}
    assert jobs_ahead(snapshot, wanted={"a2"}) == {"a2": 4}
    assert jobs_ahead(QueueSnapshot(waiting=(), busy={})) == {}


def test_jobs_ahead_gives_ties_to_the_user_served_least_recently() -> None:
    # ann's jobs are older, but bob's last claim (turn 1) is older than ann's (turn 2).
    snapshot = QueueSnapshot(
        waiting=(WaitingJob("a1", "ann", T0, 2), WaitingJob("a2", "ann", T0, 2),
                 WaitingJob("b1", "bob", T0 + timedelta(seconds=5), 1)),
        busy={"ann": 1, "bob": 1})
    assert jobs_ahead(snapshot) == {"b1": 0, "a1": 1, "a2": 2}


# ----------------------------------------------------------------------------- queue line
def test_queue_text() -> None:
    assert [queue_text(n) for n in (3, 1, 0, None)] == [
        "Queued: 3 jobs ahead", "Queued: 1 job ahead", "Queued: next in line",
        "Queued: starting"]


def test_on_a_terminal_the_line_is_rewritten_in_place_elsewhere_one_line_per_change() -> None:
    tty = io.StringIO()
    line = QueueLine(tty, is_tty=True, color=False)
    for ahead in (2, 2, 1):
        line.show(ahead)
    line.close()
    line.close()
    assert tty.getvalue() == ("\rQueued: 2 jobs ahead\x1b[K\rQueued: 1 job ahead\x1b[K\n")
    coloured = io.StringIO()
    QueueLine(coloured, is_tty=True, color=True).show(1)
    assert "\x1b[33m" in coloured.getvalue()
    plain = io.StringIO()
    piped = QueueLine(plain, is_tty=False, color=False)
    for ahead in (2, 2, 1):
        piped.show(ahead)
    piped.close()
    assert plain.getvalue() == "Queued: 2 jobs ahead\nQueued: 1 job ahead\n"


def test_colour_only_on_a_terminal_and_never_with_no_color() -> None:
    assert wants_color(True, {})
    assert not wants_color(False, {})
    assert not wants_color(True, {"NO_COLOR": "1"})
    assert wants_color(True, {"NO_COLOR": ""})  # no-color.org: set and not empty


# ----------------------------------------------------------------------------- endpoints
@pytest.fixture
def two_pythons() -> Iterator[Server]:
    yield from make_server(python_images_text="3.11=img-311,3.13=img-313")


def test_info_needs_no_key_and_submit_stores_the_checked_options(two_pythons: Server) -> None:
    server = two_pythons
    assert server.client.get("/info").json() == {"python_versions": ["3.11", "3.13"],
                                                 "default_python": "3.11"}
    created = upload(server.client, server.alice, project_zip(), python="3.13",
                     pytest_args=json.dumps(["-k", "slow", "-x"]))
    assert created.status_code == 201, created.text
    job = server.repo.get_job(created.json()["id"])
    assert (job.pytest_args, job.python_version) == (("-k", "slow", "-x"), "3.13")
    body = server.client.get(f"/jobs/{job.id}", headers=server.alice.headers).json()
    assert body["pytest_args"] == ["-k", "slow", "-x"] and body["python_version"] == "3.13"
    default = server.repo.get_job(server.submit())
    assert (default.pytest_args, default.python_version) == ((), "3.11")


@pytest.mark.parametrize(("data", "says"), [
    ({"python": "3.12"}, "choose one of 3.11, 3.13"),
    ({"pytest_args": '["-p", "no:junitxml"]'}, "'-p' is not allowed"),
    ({"pytest_args": "-k slow"}, "JSON list of strings"),
    ({"pytest_args": json.dumps(["-v"] * 65)}, "at most 64"),
])
def test_refused_options_are_400_in_one_line_and_create_nothing(two_pythons: Server,
                                                                data: dict[str, str],
                                                                says: str) -> None:
    response = upload(two_pythons.client, two_pythons.alice, project_zip(), **data)
    assert response.status_code == 400
    assert says in response.json()["detail"] and "\n" not in response.json()["detail"]
    assert two_pythons.repo.list_jobs(two_pythons.alice.user.id) == []


def test_junit_is_served_to_its_owner_and_a_missing_one_says_why(server: Server) -> None:
    xml = "<testsuites><testsuite tests='1'/></testsuites>"
    with_xml, without = server.submit(), server.submit()
    server.run(with_xml)
    server.repo.finish_job(with_xml, JobOutcome(JobStatus.COMPLETED, 0, True, None,
                                                junit_xml=xml),
                           utcnow(), fence=owner_fence(server.repo, with_xml))
    got = server.client.get(f"/jobs/{with_xml}/junit", headers=server.alice.headers)
    assert got.status_code == 200 and got.text == xml
    assert got.headers["content-type"].startswith("application/xml")
    foreign = server.client.get(f"/jobs/{with_xml}/junit", headers=server.bob.headers)
    assert foreign.status_code == 404 and foreign.json()["detail"] == f"job {with_xml} not found"
    queued = server.client.get(f"/jobs/{without}/junit", headers=server.alice.headers)
    assert queued.status_code == 404
    assert queued.json()["detail"] == f"job {without} has no JUnit report yet: it is queued"


def test_missing_junit_reasons() -> None:
    from ci_persistence.memory import InMemoryRepository
    from tests.leases import hold_lease

    repo = InMemoryRepository()
    user = repo.create_user("u", "u@example.com")
    fence = hold_lease(repo, "c")

    def ended(outcome: JobOutcome) -> str:
        job = repo.create_job(user.id, b"zip", None)
        repo.claim_next_job(fence)
        return missing_junit_reason(repo.finish_job(job.id, outcome, utcnow(), fence=fence))

    assert ended(JobOutcome(JobStatus.FAILED, 100, False, "dependency installation failed")) \
        .endswith("the tests never ran (dependency installation failed)")
    assert ended(JobOutcome(JobStatus.CANCELLED, None, False, "cancelled by user")) \
        .endswith("it was cancelled before pytest finished")
    assert ended(JobOutcome(JobStatus.COMPLETED, 4, False, None)) \
        .endswith("pytest wrote none (it stopped before reporting)")
