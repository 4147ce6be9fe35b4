"""The browser playground: one static page served at ``/playground``.

Plain HTML, CSS and an ES module inside the package: no build step, nothing
from a CDN. The page needs no key to load; every call it makes goes through
the public native API with the key the person types in. Its responses carry
a Content-Security-Policy that allows only this origin (images also as
``data:`` and ``blob:`` URLs, for thumbnails of local files), so no inline
script, no eval and no third-party request can run.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamascope.api import openapi

PLAYGROUND_PATH = "/playground"
STATIC_DIR = Path(__file__).parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    # Revalidate each load (ETag): an upgraded server serves its own page, not a cached older one.
    (b"cache-control", b"no-cache"),
]

router = APIRouter()


@router.get("/", include_in_schema=False)
async def entry(request: Request) -> Response:
    """A browser landing on the server's root goes to the playground; API clients find nothing here."""
    if "text/html" in request.headers.get("accept", ""):
        return RedirectResponse(PLAYGROUND_PATH + "/", status_code=307)
    raise HTTPException(404)


class _Secured:
    """The static files, each response with the playground's security headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"cache-control"]
                message = {**message, "headers": headers + SECURITY_HEADERS}
            await send(message)

        await self.app(scope, receive, send_secured)


def playground_files() -> ASGIApp:
    """The ASGI app to mount at ``PLAYGROUND_PATH``: the page, its script and styles."""
    return _Secured(StaticFiles(directory=STATIC_DIR, html=True))


OPERATIONS = (
    openapi.operation(
        "GET",
        "/",
        "Browsers go to the playground; other clients find nothing here",
        tag="playground",
        auth=None,
        ok=False,
        others={307: "Accept: text/html: to /playground/"},
        refusals=(404,),
    ),
    openapi.operation(
        "GET",
        PLAYGROUND_PATH + "/{path}",
        "The playground: its page (/playground/), script, styles and icon",
        tag="playground",
        auth=None,
        ok="*/*",
        refusals=(404,),
    ),
)
