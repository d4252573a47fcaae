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
