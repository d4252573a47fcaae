"""The HTML pages the server itself serves."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from audit.accounts import Role
from server.auth.sessions import authenticate

STATIC_DIR = Path(__file__).with_name("static")

routes = web.RouteTableDef()


@routes.get("/")
async def index(_request: web.Request) -> web.FileResponse:
    """The start page."""
    return web.FileResponse(STATIC_DIR / "index.html")


# Each role's own page (as js/roles.js has it); a role without one gets the
# therapist's, which says so.
HOME_PAGES = {Role.SUPPORT: "/support", Role.ADMIN: "/admin", Role.THERAPIST: "/app"}


@routes.get("/login")
async def login_page(request: web.Request) -> web.StreamResponse:
    """The professionals' login page; someone logged in already (a bookmark,
    the back button) goes on to their own page, its ``next`` kept when it is
    that page. Checked here, so that the page need not ask /api/session and
    have a 401 logged in the browser's console on every visit."""
    principal = await authenticate(request)
    if principal is None:
        return web.FileResponse(STATIC_DIR / "login.html")
    home = HOME_PAGES.get(principal.account.role, "/app")
    wanted = request.query.get("next", "")
    target = wanted if wanted.split("?", 1)[0] == home else home
    raise web.HTTPFound(target)


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
