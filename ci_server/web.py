"""The web page: plain HTML, CSS and ES modules from `ci_server/static`, served by every replica.

    GET /               the page (index.html); the app routes by the URL fragment (#/jobs/<id>),
                        so no page path can shadow the JSON API's /jobs/{id}
    GET /assets/<file>  its scripts, style sheet and icon

Nothing is built and nothing is fetched from elsewhere: the files ship as package data. The page
talks to the same JSON API as `ci`, with the API key the user typed (kept in the tab's session
storage, sent as a Bearer header). Page responses carry a Content-Security-Policy that allows
only this origin's own scripts and styles (no inline script, no inline style attribute, no
plugin, no framing) and `X-Content-Type-Options: nosniff`; the JSON API's headers are left alone.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from starlette.datastructures import MutableHeaders
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC_DIR = Path(__file__).with_name("static")
ASSETS_PATH = "/assets"

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "base-uri 'none'",
    # The sign-in form is handled by script; if the script never ran, submit sends nothing.
    "form-action 'none'",
    "frame-ancestors 'none'",
])
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # for browsers that predate frame-ancestors
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Revalidate every time (StaticFiles answers 304 to a matching ETag): a new release's
    # scripts are never mixed with a cached older page.
    "Cache-Control": "no-cache",
}


class PageHeaders:
    """ASGI wrapper: adds PAGE_HEADERS to every response of the app it wraps."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in PAGE_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, with_headers)


router = APIRouter(include_in_schema=False)


@router.api_route("/", methods=["GET", "HEAD"])
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8",
                        headers=PAGE_HEADERS)


def install_web(app: FastAPI) -> None:
    """Serve the page at / and its files under /assets (create_app calls this once)."""
    app.include_router(router)
    app.mount(ASSETS_PATH, PageHeaders(StaticFiles(directory=STATIC_DIR)), name="assets")
