"""The web page's safety in a real browser: where the key is kept, output that is text and never
markup, the Content-Security-Policy at work, and users who cannot see each other's jobs.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Dialog, expect

from tests.browser.web import Web
from tests.e2e.harness import PASSING_TEST, write_project

pytestmark = pytest.mark.docker

SCRIPT_TAG = "<script>alert(1)</script>"
IMG_TAG = "<img src=x onerror=alert(1)>"
# Printed by the job: markup that would run if it were ever parsed as HTML, and ANSI colours.
XSS_TEST = (
    "def test_prints_markup():\n"
    "    print()\n"
    f"    print({SCRIPT_TAG!r})\n"
    f"    print({IMG_TAG!r})\n"
    "    print('<b onmouseover=alert(2)>bold?</b> &amp; &lt;')\n"
    "    print('\\x1b[31mred words\\x1b[0m then \\x1b[1;32mbold green\\x1b[0m plain')\n"
    "    print('\\x1b[38;5;208morange\\x1b[0m \\x1b]0;a window title\\x07after the title')\n"
)


def test_the_key_stays_in_the_tab_and_sign_out_forgets_it(web: Web) -> None:
    user = web.user()
    tab = web.tab()
    tab.open()
    tab.page.keyboard.type("ci_" + "x" * 43)  # a well-formed key nobody has
    tab.page.keyboard.press("Enter")
    expect(tab.page.locator("#notice")).to_have_text("Sign-in failed: invalid API key")
    expect(tab.page.locator("#view-sign-in")).to_be_visible()
    assert tab.storage()["session"] == {}

    tab.page.locator("#api-key").fill("")
    tab.sign_in(user.api_key)
    expect(tab.page.locator("#jobs-count")).to_have_text("0 jobs")
    expect(tab.page.locator("#api-key")).to_have_value("")

    storage = tab.storage()
    assert list(storage["session"].values()) == [user.api_key]
    assert storage["local"] == {} and storage["cookie"] == ""
    assert tab.page.context.cookies() == []
    api = [r for r in tab.requests if urlsplit(r.url).path.startswith("/jobs")]
    assert len(api) >= 3 and all(user.api_key not in r.url for r in tab.requests)
    # The first call was the refused key; every one since carries the key, as a header.
    assert all(r.all_headers().get("authorization") == f"Bearer {user.api_key}" for r in api[1:])

    other_tab = tab.page.context.new_page()  # session storage is per tab
    other_tab.goto(web.base_url + "/")
    expect(other_tab.locator("#view-sign-in")).to_be_visible()

    tab.page.reload()  # a reload keeps the tab signed in
    expect(tab.page.locator("#view-jobs")).to_be_visible()
    tab.page.locator("#sign-out").focus()
    tab.page.keyboard.press("Enter")
    expect(tab.page.locator("#view-sign-in")).to_be_visible()
    expect(tab.page.locator("#api-key")).to_be_focused()
    assert tab.storage()["session"] == {}
    tab.page.reload()
    expect(tab.page.locator("#view-sign-in")).to_be_visible()
    assert tab.errors == []


def test_job_output_is_text_never_markup_and_ansi_colours_render(
    web: Web, tmp_path: Path, artifacts: Path
) -> None:
    user = web.user()
    project = write_project(tmp_path / "p", {"test_markup.py": XSS_TEST}, capture=False)
    # Without the CSP, so that only the rendering itself stands between the output and a script.
    tab = web.tab(bypass_csp=True)
    dialogs: list[str] = []

    def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    tab.page.on("dialog", on_dialog)
    tab.open()
    tab.sign_in(user.api_key)
    job_id = web.submit(project, user.api_key)
    tab.open_job(job_id)
    assert tab.wait_for_result() == "✓ Tests passed (exit code 0)"

    lines = tab.log_lines()
    assert SCRIPT_TAG in lines and IMG_TAG in lines
    assert "<b onmouseover=alert(2)>bold?</b> &amp; &lt;" in lines
    log = tab.page.locator("#job-log")
    assert log.locator("script, img, b, iframe").count() == 0
    assert dialogs == []

    # ANSI: coloured spans, no escape characters left in the text.
    assert "red words then bold green plain" in lines
    assert "orange after the title" in lines
    assert not any("\x1b" in line or "[31m" in line for line in lines)
    red = log.locator("span.fg-red", has_text="red words")
    expect(red).to_have_css("color", "rgb(239, 107, 107)")
    bold_green = log.locator("span.fg-green.sgr-bold", has_text="bold green")
    expect(bold_green).to_have_css("font-weight", "700")
    expect(log.locator("span", has_text="orange")).to_have_css("color", "rgb(255, 135, 0)")
    plain_line = log.locator(".line", has_text="red words")
    expect(plain_line.locator("span", has_text="plain")).to_have_count(0)  # reset to plain
    tab.page.screenshot(path=str(artifacts / "job-page-markup.png"))

    # A job id in the address is text too.
    tab.page.evaluate("(id) => { location.hash = '#/jobs/' + encodeURIComponent(id); }",
                      IMG_TAG)
    expect(tab.page.locator("#view-missing")).to_be_visible()
    expect(tab.page.locator("#missing-id")).to_have_text(IMG_TAG)
    assert tab.page.locator("main img").count() == 0
    assert dialogs == [] and tab.errors == []


def test_the_csp_refuses_inline_script(web: Web) -> None:
    user = web.user()
    tab = web.tab()
    response = tab.page.goto(web.base_url + "/")
    assert response is not None
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    tab.sign_in(user.api_key)
    violations = tab.page.evaluate("""() => new Promise((resolve) => {
        const seen = [];
        document.addEventListener("securitypolicyviolation",
                                  (event) => seen.push(event.effectiveDirective));
        const script = document.createElement("script");
        script.textContent = "window.__inline = 1";
        document.body.append(script);
        const img = document.createElement("img");
        img.setAttribute("onerror", "window.__handler = 1");
        img.src = "/nothing-here.png";
        document.body.append(img);
        setTimeout(() => resolve(seen), 1000);
    })""")
    assert tab.page.evaluate("[window.__inline, window.__handler]") == [None, None]
    assert "script-src-elem" in violations and "script-src-attr" in violations


def test_another_users_job_is_not_found_in_the_page(web: Web, tmp_path: Path) -> None:
    alice, bob = web.user(), web.user()
    project = write_project(tmp_path / "p", {"test_ok.py": PASSING_TEST})
    job_id = web.submit(project, alice.api_key)

    tab = web.tab()
    tab.open()
    tab.sign_in(bob.api_key)
    expect(tab.page.locator("#jobs-count")).to_have_text("0 jobs")
    tab.page.evaluate("(id) => { location.hash = '#/jobs/' + id; }", job_id)
    expect(tab.page.locator("#view-missing")).to_be_visible()
    expect(tab.page.locator("#missing-title")).to_have_text("Job not found")
    expect(tab.page.locator("#missing-id")).to_have_text(job_id)
    expect(tab.page.locator("#view-job")).to_be_hidden()
    assert tab.page.locator("#job-log .line").count() == 0

    alice_tab = web.tab()  # the same address works for its owner
    alice_tab.open(f"#/jobs/{job_id}")
    alice_tab.sign_in(alice.api_key)
    expect(alice_tab.page.locator("#job-id")).to_have_text(job_id)
    assert alice_tab.wait_for_result() == "✓ Tests passed (exit code 0)"
