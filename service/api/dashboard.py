"""The web dashboard: static HTML/CSS/JS under /ui/ (and / redirects there), no build step, no external assets.

static/: index.html, style.css and ES modules: app.js (the pages: sign-in, job list, job, the generated submit
form), lib.js (DOM and SVG builders, the API with the tab's key, event streams), compare.js (finished jobs side
by side: perplexity against true bits, per block N and layer error).

The files hold no data and need no auth; the page asks for an API key, keeps it in sessionStorage and sends it
as `Authorization: Bearer <key>` to the /v1 API like any other client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC = Path(__file__).resolve().parent / "static"
PREFIX = "/ui"

# Only this origin's scripts, styles and API; no framing; nothing inline.
SECURITY_HEADERS = {
    b"content-security-policy": b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    b"img-src 'self' data: blob:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-cache",
}


class _Secured:
    """Adds SECURITY_HEADERS to every response of the wrapped (static files) app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_secured(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                names = set(SECURITY_HEADERS)
                kept = [(k, v) for k, v in msg.get("headers", []) if k.lower() not in names]
                msg = {**msg, "headers": kept + list(SECURITY_HEADERS.items())}
            await send(msg)

        await self.app(scope, receive, send_secured)


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard at /ui/ and redirect / to it (neither needs auth: the data comes from /v1)."""

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/", status_code=307)

    app.mount(PREFIX, _Secured(StaticFiles(directory=STATIC, html=True)), name="dashboard")
