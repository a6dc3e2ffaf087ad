"""Driving the web page in tests: sign in, open a job, read the log as the user sees it.

`Web` owns the browser contexts it opens (closed after the test) and records, per page, the
script errors and every request the page made, so a test can check what was sent where.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, BrowserContext, Page, Request, expect

from ci_client.client import CIClient
from ci_client.events import EndEvent, OutputEvent
from tests.e2e.harness import REPO_ROOT, Deployment, Process, User, submit_async

ARTIFACTS_DIR = REPO_ROOT / "artifacts"
# Records, in the page, when each `tick <n> <unix time> end` line first shows in the log: the
# moment the DOM changed, on the same clock as the container's time.time().
TICK_RECORDER = r"""
window.__ticks = {};
new MutationObserver((mutations) => {
  const now = Date.now() / 1000;
  for (const mutation of mutations) {
    for (const node of [mutation.target, ...mutation.addedNodes]) {
      const element = node.nodeType === 1 ? node : node.parentElement;
      const line = element && element.closest && element.closest(".line");
      if (!line) continue;
      for (const match of line.textContent.matchAll(/tick (\d+) ([\d.]+) end/g)) {
        if (!(match[1] in window.__ticks)) {
          window.__ticks[match[1]] = { printed: Number(match[2]), seen: now };
        }
      }
    }
  }
}).observe(document, { childList: true, subtree: true, characterData: true });
"""


def ticks_test(count: int, delay_s: float) -> str:
    """A test printing `tick <n> <unix time> end` lines, `delay_s` apart."""
    return (
        "import time\n"
        "def test_ticks():\n"
        "    print()\n"
        f"    for i in range(1, {count} + 1):\n"
        "        print(f'tick {i} {time.time():.3f} end', flush=True)\n"
        f"        time.sleep({delay_s})\n"
    )


def tick_numbers(lines: list[str]) -> list[int]:
    matches = (re.fullmatch(r"tick (\d+) [\d.]+ end", line) for line in lines)
    return [int(m.group(1)) for m in matches if m]


@dataclass
class Tab:
    """One page (a browser tab) and what it did."""

    page: Page
    base_url: str
    errors: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def open(self, fragment: str = "#/") -> None:
        self.page.goto(f"{self.base_url}/{fragment}")

    def sign_in(self, key: str) -> None:
        """Sign in with the keyboard alone: the key field has the focus when the page opens."""
        expect(self.page.locator("#view-sign-in")).to_be_visible()
        expect(self.page.locator("#api-key")).to_be_focused()
        self.page.keyboard.type(key)
        self.page.keyboard.press("Enter")
        expect(self.page.locator("#view-sign-in")).to_be_hidden()

    def open_job(self, job_id: str) -> None:
        self.page.evaluate("(id) => { location.hash = '#/jobs/' + id; }", job_id)
        expect(self.page.locator("#view-job")).to_be_visible()
        expect(self.page.locator("#job-id")).to_have_text(job_id)

    def log_lines(self) -> list[str]:
        """The log as shown, one string per line."""
        lines: list[str] = self.page.locator("#job-log .line").evaluate_all(
            "(lines) => lines.map((line) => line.textContent)")
        return lines

    def ticks(self) -> dict[int, dict[str, float]]:
        raw: dict[str, dict[str, float]] = self.page.evaluate("window.__ticks")
        return {int(n): seen for n, seen in raw.items()}

    def wait_for_result(self, timeout_s: float = 120) -> str:
        result = self.page.locator("#job-result")
        expect(result).to_have_text(re.compile(r"^[✓✗] "), timeout=timeout_s * 1000)
        return str(result.text_content())

    def storage(self) -> dict[str, Any]:
        state: dict[str, Any] = self.page.evaluate(
            "() => ({session: {...sessionStorage}, local: {...localStorage},"
            " cookie: document.cookie})")
        return state


class Web:
    """A running deployment and the browser that looks at it."""

    def __init__(self, deployment: Deployment, browser: Browser) -> None:
        self.deployment = deployment
        self.browser = browser
        self.contexts: list[BrowserContext] = []

    @property
    def server(self) -> Process:
        return [p for p in self.deployment.processes if p.name == "server"][-1]

    @property
    def base_url(self) -> str:
        return str(self.server.url)

    def tab(self, width: int = 1100, height: int = 800, bypass_csp: bool = False,
            record_ticks: bool = False) -> Tab:
        context = self.browser.new_context(viewport={"width": width, "height": height},
                                           bypass_csp=bypass_csp, accept_downloads=True)
        self.contexts.append(context)
        if record_ticks:
            context.add_init_script(TICK_RECORDER)
        page = context.new_page()
        page.set_default_timeout(30_000)
        tab = Tab(page=page, base_url=self.base_url)
        page.on("pageerror", lambda error: tab.errors.append(str(error)))
        page.on("request", lambda request: tab.requests.append(request))
        return tab

    def user(self) -> User:
        return self.deployment.create_user()

    def submit(self, project: Path, key: str) -> str:
        return submit_async(self.deployment, self.server, project, key)

    def output(self, job_id: str, key: str) -> str:
        """The job's whole output as the API streams it (the job must end)."""
        chunks: list[str] = []
        with CIClient(self.base_url, key) as client:
            for event in client.stream_events(job_id, since="start"):
                if isinstance(event, OutputEvent):
                    chunks.append(event.text)
                elif isinstance(event, EndEvent):
                    break
        return "".join(chunks)

    def close(self) -> None:
        for context in self.contexts:
            context.close()
