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


@routes.get("/enrol/{token}")
async def enrol(_request: web.Request) -> web.FileResponse:
    """The enrolment page; its script reads the token from the address."""
    return web.FileResponse(STATIC_DIR / "enrol.html")


def setup_static(app: web.Application) -> None:
    """Serve the pages' scripts and styles from /static/ (no outside CDN)."""
    app.router.add_static("/static/", STATIC_DIR, append_version=False)
