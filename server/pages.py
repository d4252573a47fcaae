"""The HTML pages the server itself serves."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).with_name("static")

routes = web.RouteTableDef()


@routes.get("/")
async def index(_request: web.Request) -> web.FileResponse:
    """The start page."""
    return web.FileResponse(STATIC_DIR / "index.html")


@routes.get("/login")
async def login_page(_request: web.Request) -> web.FileResponse:
    """The professionals' login page."""
    return web.FileResponse(STATIC_DIR / "login.html")


@routes.get("/app")
async def therapist_app(_request: web.Request) -> web.FileResponse:
    """The therapist's app: consults, invite links, the call; it asks the API who is logged in."""
    return web.FileResponse(STATIC_DIR / "app.html")


@routes.get("/support")
async def support_page(_request: web.Request) -> web.FileResponse:
    """The support view: consults of the organisation, charts, technical logs; its
    script asks the API, which answers only a support account."""
    return web.FileResponse(STATIC_DIR / "support.html")


@routes.get("/join/{token}")
async def join(_request: web.Request) -> web.FileResponse:
    """The patient's page of an invite link; its script checks the link through the API."""
    return web.FileResponse(STATIC_DIR / "join.html")


@routes.get("/enrol/{token}")
async def enrol(_request: web.Request) -> web.FileResponse:
    """The enrolment page; its script reads the token from the address."""
    return web.FileResponse(STATIC_DIR / "enrol.html")


# Paths that are never a page: their errors stay JSON whatever the client accepts.
_NOT_PAGES = ("/api/", "/ws", "/static/", "/healthz", "/readyz", "/metrics")


def wants_page(request: web.Request) -> bool:
    """Whether an error for ``request`` should be an HTML page: a browser
    (its Accept names text/html) asking for something that could be a page."""
    if request.method not in ("GET", "HEAD") or request.path.startswith(_NOT_PAGES):
        return False
    return "text/html" in request.headers.get("Accept", "")


def not_found_page() -> web.Response:
    """The page a browser gets for an unknown address (404)."""
    return web.Response(
        status=404,
        body=(STATIC_DIR / "not-found.html").read_bytes(),
        content_type="text/html",
        charset="utf-8",
    )


def setup_static(app: web.Application) -> None:
    """Serve the pages' scripts and styles from /static/ (no outside CDN)."""
    app.router.add_static("/static/", STATIC_DIR, append_version=False)
