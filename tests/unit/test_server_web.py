"""The web page as the server ships it: served at / with its security headers, its files in the
package data, the JSON API untouched. (The page's behaviour is tested in tests/browser.)
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

from ci_server.web import ASSETS_PATH, CONTENT_SECURITY_POLICY, STATIC_DIR
from tests.unit.test_server_support import Server, server

__all__ = ["server"]

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(STATIC_DIR.glob("*.js"))


def test_the_page_is_served_at_the_root_with_its_policy(server: Server) -> None:
    response = server.client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script type="module" src="/assets/app.js"></script>' in response.text
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert server.client.head("/").status_code == 200


def test_the_policy_allows_no_inline_script_nor_other_origins() -> None:
    directives = dict(part.split(" ", 1) for part in CONTENT_SECURITY_POLICY.split("; "))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY


@pytest.mark.parametrize("name", ["app.js", "style.css", "favicon.svg"])
def test_assets_carry_the_headers_and_a_fitting_type(server: Server, name: str) -> None:
    response = server.client.get(f"{ASSETS_PATH}/{name}")
    assert response.status_code == 200
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    expected = {"js": "javascript", "css": "text/css", "svg": "image/svg+xml"}[name.split(".")[1]]
    assert expected in response.headers["content-type"]


def test_a_missing_asset_is_a_one_line_404(server: Server) -> None:
    response = server.client.get(f"{ASSETS_PATH}/nope.js")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}
    assert server.client.get(f"{ASSETS_PATH}/%2e%2e/web.py").status_code == 404


def test_the_json_api_keeps_its_own_headers(server: Server) -> None:
    response = server.client.get("/jobs", headers=server.alice.headers)
    assert response.status_code == 200
    assert "content-security-policy" not in response.headers
    assert response.headers["content-type"] == "application/json"


def test_every_page_file_is_package_data() -> None:
    """An installed wheel serves the page only if pyproject ships each of its files."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["ci_server"]
    files = [path.relative_to(STATIC_DIR.parent).as_posix() for path in STATIC_DIR.rglob("*")
             if path.is_file()]
    assert "static/index.html" in files
    unshipped = [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert unshipped == []


def test_every_module_the_page_imports_exists() -> None:
    for script in SCRIPTS:
        for target in re.findall(r'^import .* from "\./([\w.]+)";$', script.read_text(),
                                 flags=re.MULTILINE | re.DOTALL):
            assert (STATIC_DIR / target).is_file(), f"{script.name} imports {target}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_scripts_never_turn_text_into_markup(script: Path) -> None:
    """Output, reasons and ids go into the page as text nodes only; these would parse HTML."""
    text = script.read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                 "createContextualFragment", "DOMParser", "eval(", "new Function",
                 "setAttribute(\"on", "srcdoc"):
        assert sink not in text, f"{script.name} uses {sink}"
