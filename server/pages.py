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


@routes.get("/admin")
async def admin_page(_request: web.Request) -> web.FileResponse:
    """The admin console: accounts, retention, practice settings, the access log;
    its script asks the API, which answers only an admin account."""
    return web.FileResponse(STATIC_DIR / "admin.html")


@routes.get("/join/{token}")
async def join(_request: web.Request) -> web.FileResponse:
    """The patient's page of an invite link; its script checks the link through the API."""
    return web.FileResponse(STATIC_DIR / "join.html")


@routes.get("/enrol/{token}")
async def enrol(_request: web.Request) -> web.FileResponse:
    """The enrolment page; its script reads the token from the address."""
    return web.FileResponse(STATIC_DIR / "enrol.html")


def setup_static(app: web.Application) -> None:
    """Serve the pages' scripts and styles from /static/ (no outside CDN)."""
    app.router.add_static("/static/", STATIC_DIR, append_version=False)
