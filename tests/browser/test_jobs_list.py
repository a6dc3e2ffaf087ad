"""The jobs list in a real browser: it fills in by itself as jobs run, filters by status, opens a
job from the keyboard, shows why a job failed, and fits a 375 px wide phone screen.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import expect

from ci_client.client import CIClient
from tests.browser.web import Tab, Web
from tests.e2e.harness import FAILING_TEST, PASSING_TEST, write_project

pytestmark = pytest.mark.docker

SLEEPING_TEST = "import time\ndef test_sleeps():\n    time.sleep(300)\n"


def rows(tab: Tab) -> list[dict[str, str]]:
    """The table as shown: one dict per row, column label → text."""
    cells: list[dict[str, str]] = tab.page.locator("#jobs-body tr").evaluate_all(
        "(rows) => rows.map((row) => Object.fromEntries([...row.cells].map("
        "(cell) => [cell.dataset.label, cell.textContent])))")
    return cells


def fits_width(tab: Tab, width: int) -> None:
    """Nothing sticks out sideways: no horizontal scrolling at this width."""
    overflow = tab.page.evaluate("document.documentElement.scrollWidth")
    assert overflow <= width, f"the page is {overflow} px wide in a {width} px viewport"


def test_the_list_updates_by_itself_filters_and_opens_a_job_from_the_keyboard(
    web: Web, tmp_path: Path, artifacts: Path
) -> None:
    user = web.user()
    tab = web.tab()
    tab.open()
    tab.sign_in(user.api_key)
    expect(tab.page.locator("#jobs-empty")).to_be_visible()
    tab.page.evaluate("window.__sameDocument = true")

    projects = {
        "passing": write_project(tmp_path / "ok", {"test_ok.py": PASSING_TEST}),
        "failing": write_project(tmp_path / "bad", {"test_bad.py": FAILING_TEST}),
        "broken": write_project(tmp_path / "deps", {"test_ok.py": PASSING_TEST},
                                requirements="pytest\nno-such-package-ci-web-e2e==0.0.1\n"),
        "sleeping": write_project(tmp_path / "sleep", {"test_sleep.py": SLEEPING_TEST}),
    }
    ids = {name: web.submit(project, user.api_key) for name, project in projects.items()}
    with CIClient(web.base_url, user.api_key) as client:
        client.cancel(ids["sleeping"])

    body = tab.page.locator("#jobs-body")
    for name, status, mark in [("passing", "completed", "✓"), ("failing", "completed", "✗"),
                               ("broken", "failed", "✗"), ("sleeping", "cancelled", "✗")]:
        row = body.locator(f"tr[data-job-id='{ids[name]}']")
        expect(row.locator("td[data-label='Status']")).to_have_text(status, timeout=120_000)
        expect(row.locator("td[data-label='Success']")).to_have_text(mark)
    assert tab.page.evaluate("window.__sameDocument") is True  # no reload: it refreshed itself
    shown = rows(tab)
    assert [row["Job ID"] for row in shown] == [ids[n] for n in
                                                ("sleeping", "broken", "failing", "passing")]
    passing = shown[-1]
    assert [row["Tests"] for row in shown] == ["-", "-", "1 failed", "1 passed"]
    assert passing["Start time"] != "N/A" and passing["End time"] != "N/A"
    assert passing["Duration"].endswith(" s")
    expect(tab.page.locator("#jobs-count")).to_have_text("4 jobs")
    tab.page.screenshot(path=str(artifacts / "jobs-list.png"))

    tab.page.locator("#status-filter").select_option("completed")
    expect(tab.page.locator("#jobs-count")).to_have_text("2 completed jobs")
    assert [row["Job ID"] for row in rows(tab)] == [ids["failing"], ids["passing"]]
    tab.page.locator("#status-filter").select_option("failed")
    expect(tab.page.locator("#jobs-count")).to_have_text("1 failed job")
    assert [row["Job ID"] for row in rows(tab)] == [ids["broken"]]
    assert tab.page.url.endswith("#/?status=failed")
    tab.page.reload()  # the filter is in the address, the key in the tab
    expect(tab.page.locator("#status-filter")).to_have_value("failed")
    expect(tab.page.locator("#jobs-count")).to_have_text("1 failed job")

    # Keyboard alone: Tab to the job's link, Enter opens it; the reason says why it failed.
    link = tab.page.locator(f"#jobs-body a[href='#/jobs/{ids['broken']}']")
    for _ in range(10):
        tab.page.keyboard.press("Tab")
        if link.evaluate("(a) => a === document.activeElement"):
            break
    expect(link).to_be_focused()
    tab.page.keyboard.press("Enter")
    expect(tab.page.locator("#job-id")).to_have_text(ids["broken"])
    assert tab.wait_for_result() == "✗ Job failed: dependency installation failed"
    expect(tab.page.locator("#job-log")).to_contain_text("no-such-package-ci-web-e2e")
    expect(tab.page.locator("#job-cancel")).to_be_disabled()
    expect(tab.page.locator("#job-title")).to_be_focused()  # a new view takes the focus
    tab.page.keyboard.press("Shift+Tab")
    expect(tab.page.get_by_role("link", name="← All jobs").first).to_be_focused()
    tab.page.keyboard.press("Enter")
    expect(tab.page.locator("#view-jobs")).to_be_visible()
    expect(tab.page.locator("#status-filter")).to_have_value("")
    assert tab.errors == []


def test_list_and_job_page_fit_a_375_px_screen(web: Web, tmp_path: Path,
                                               artifacts: Path) -> None:
    user = web.user()
    project = write_project(tmp_path / "p", {"test_ok.py": PASSING_TEST})
    job_id = web.submit(project, user.api_key)
    tab = web.tab(width=375, height=740)
    tab.open()
    tab.sign_in(user.api_key)
    row = tab.page.locator(f"#jobs-body tr[data-job-id='{job_id}']")
    expect(row.locator("td[data-label='Success']")).to_have_text("✓", timeout=120_000)
    expect(tab.page.locator("#jobs-table thead")).to_be_hidden()  # rows become cards
    fits_width(tab, 375)
    tab.page.screenshot(path=str(artifacts / "jobs-list-375px.png"), full_page=True)

    tab.page.evaluate("""() => {
        window.__statuses = [];
        const status = document.getElementById("job-status");
        new MutationObserver(() => {
            if (status.textContent && window.__statuses.at(-1) !== status.textContent) {
                window.__statuses.push(status.textContent);
            }
        }).observe(status, { childList: true, characterData: true, subtree: true });
    }""")
    row.locator("a").click()
    assert tab.wait_for_result() == "✓ Tests passed (exit code 0)"
    # The replayed history (queued, running, …) never shows a finished job going backwards.
    tab.page.wait_for_timeout(1500)
    assert tab.page.evaluate("window.__statuses") == ["completed"]
    expect(tab.page.locator("#job-log")).to_contain_text("1 passed")
    fits_width(tab, 375)
    for button in ("#job-cancel", "#job-download", "#sign-out"):
        box = tab.page.locator(button).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375, button
    tab.page.screenshot(path=str(artifacts / "job-page-375px.png"))
    assert tab.errors == []
