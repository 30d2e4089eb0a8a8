"""The dashboard's pages (Jinja2 templates in bootd/ui/templates) and its gate, on the `ui.listen` site only.

The gate (called by bootd/http/app.py's access middleware for that site) lets through the login page and
the static files; everything else, pages and /api/v1 alike, needs a live session whose account still
exists. A change (any method but GET/HEAD) also needs the session's CSRF token in X-CSRF-Token (or the
form field `_csrf`), a same-origin Origin header when the browser sends one, and the `admin` role: a
viewer's change is a 403. Pages only read; every button sends its change as JSON to the same /api/v1
handler bootctl calls (bootd/ui/static/ui.js), which records the dashboard user as the actor.

Logins share the accounts and the failure lock-out with the PXE admin menu (bootd/admins.py), counted per
account and per browser address.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import quote, urlsplit

import aiohttp_jinja2
import jinja2
from aiohttp import web

from bootd.admins import LockoutPolicy
from bootd.hostfeed import HostFeed, tile_of
from bootd.hoststate import host_states
from bootd.http.admin_menu import AdminSide, side_for
from bootd.http.app import is_ui_path
from bootd.ui.sessions import Session, SessionBook
from bootd.ui.views import audit_view, images_view, pc_view, rooms_view, server_view
from bootd.units import human

if TYPE_CHECKING:
    from bootd.daemon import Context

log = logging.getLogger("bootd.ui")

COOKIE = "bootd_session"
LOGIN_COOKIE = "bootd_login"  # the login form's own CSRF token (double submit), before there is a session
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
STATIC = Path(__file__).parent / "static"
PING_EVERY = 15.0  # seconds between keep-alive comments on an idle live stream


class UiSide:
    """The sessions of this process, kept across reloads; accounts and lock-outs are the admin menu's."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.admin: AdminSide = side_for(ctx)
        self.sessions = SessionBook(ctx.config.ui.session_idle, ctx.config.ui.session_max)

    def configure(self) -> None:
        cfg = self.ctx.config
        self.sessions.idle, self.sessions.max_age = cfg.ui.session_idle, cfg.ui.session_max
        self.admin.gate.limiter.policy = LockoutPolicy(free_failures=cfg.menu.admin_lockout_after,
                                                       first_lockout=cfg.menu.admin_lockout)

    def client_ip(self, request: web.Request) -> str:
        """The browser's address: the peer, or behind a proxy on loopback the last X-Forwarded-For hop."""
        peer = request.remote or "?"
        if self.ctx.config.ui.behind_proxy and _is_loopback(peer):
            hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
            if hops:
                return hops[-1]
        return peer


_UI_SIDES: dict[int, UiSide] = {}


def ui_side(ctx: Context) -> UiSide:
    side = _UI_SIDES.get(id(ctx))
    if side is None or side.ctx is not ctx:
        side = _UI_SIDES[id(ctx)] = UiSide(ctx)
    side.configure()
    return side


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _error(request: web.Request, status: int, reason: str) -> web.Response:
    if request.path.startswith("/api/") or request.path == "/ui/events":
        return web.json_response({"error": reason}, status=status)
    return web.Response(status=status, text=f"{status}: {reason}\n", content_type="text/plain")


async def gate(request: web.Request) -> Optional[web.Response]:
    """None: go on to the handler; else the refusal (see the module's docstring)."""
    path = request.path
    if not (is_ui_path(path) or path.startswith("/api/v1/")):
        return web.Response(status=404, text="not found")
    side = ui_side(request.app["ctx"])
    request["client_ip"] = side.client_ip(request)
    if path == "/ui/login" or path.startswith("/ui/static/"):
        return None
    session = side.sessions.get(request.cookies.get(COOKIE))
    role = side.admin.accounts.role(session.user) if session is not None else None
    if session is None or role is None:
        if session is not None:  # the account was removed: its logins end now
            side.sessions.drop_user(session.user)
        if path.startswith("/api/") or path == "/ui/events" or request.method not in SAFE_METHODS:
            return _error(request, 401, "not logged in (or the login expired): log in at /ui/login")
        raise web.HTTPSeeOther(f"/ui/login?next={quote(request.path_qs, safe='')}")
    request["ui_session"], request["ui_user"], request["ui_role"] = session, session.user, role
    if request.method in SAFE_METHODS:
        return None
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        return _error(request, 403, f"cross-origin request from {origin} refused")
    token = request.headers.get("X-CSRF-Token")
    if token is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        token = str((await request.post()).get("_csrf") or "")
    if not side.sessions.csrf_ok(session, token):
        return _error(request, 403, "missing or wrong CSRF token (reload the page)")
    if role != "admin" and path != "/ui/logout":
        return _error(request, 403, f"{session.user} is a viewer account: it changes nothing")
    return None


# -- login, logout ---------------------------------------------------------------------------------------
def _cookie_args(path: str = "/") -> dict[str, Any]:
    return {"httponly": True, "secure": True, "samesite": "Strict", "path": path}


def _next(value: Optional[str]) -> str:
    """Where to go after the login: a page of the dashboard, never another site."""
    if value and value.startswith("/ui/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui/rooms"


async def login_page(request: web.Request, error: str = "", status: int = 200) -> web.Response:
    token = secrets.token_urlsafe(24)
    resp = aiohttp_jinja2.render_template("login.html", request, {
        "login_token": token, "next": _next(request.query.get("next")), "error": error, "user": None})
    resp.set_status(status)
    resp.set_cookie(LOGIN_COOKIE, token, max_age=3600, **_cookie_args("/ui/login"))
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def login(request: web.Request) -> web.Response:
    ctx: Context = request.app["ctx"]
    side = ui_side(ctx)
    form = await request.post()
    name, password = str(form.get("name") or "")[:64], str(form.get("password") or "")
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not secrets.compare_digest(expected, str(form.get("login_token") or "")):
        return await login_page(request, "The login form had expired. Please try again.", 403)
    where = f"web {request['client_ip']}"
    gate_ = side.admin.gate
    locked = gate_.locked_for(name, where)
    if locked > 0:
        ctx.metrics.inc("ui", "login_refused", reason="locked")
        log.warning("dashboard login of %r from %s refused: locked for %.0f s more", name, request["client_ip"], locked)
        return await login_page(request, f"Too many failed logins: locked for {locked:.0f} more seconds.", 429)
    accounts = side.admin.accounts
    stored = accounts.stored_hash(name)
    ok = await asyncio.to_thread(accounts.check, stored, password)
    result = gate_.record(name, where, ok)
    if not ok or stored is None:
        ctx.metrics.inc("ui", "login_refused", reason="password")
        log.warning("dashboard login of %r from %s refused: wrong name or password (%d failures%s)", name,
                    request["client_ip"], result.failures,
                    f", locked for {result.locked_for:.0f} s" if result.locked_for else "")
        await asyncio.sleep(ctx.config.menu.admin_failure_delay)
        if result.locked_for:
            return await login_page(request, f"Too many failed logins: locked for {result.locked_for:.0f} seconds.",
                                    429)
        return await login_page(request, "Wrong name or password.", 401)
    accounts.rehash_if_needed(name, stored, password)
    session = side.sessions.create(name)
    ctx.metrics.inc("ui", "logins")
    log.info("dashboard: %s logged in from %s", name, request["client_ip"])
    resp = web.HTTPSeeOther(_next(str(form.get("next") or "")))
    resp.set_cookie(COOKIE, session.id, **_cookie_args())
    resp.del_cookie(LOGIN_COOKIE, path="/ui/login")
    raise resp


async def logout(request: web.Request) -> web.Response:
    session: Session = request["ui_session"]
    ui_side(request.app["ctx"]).sessions.drop(session.id)
    log.info("dashboard: %s logged out", session.user)
    resp = web.HTTPSeeOther("/ui/login")
    resp.del_cookie(COOKIE, path="/")
    raise resp


# -- pages -------------------------------------------------------------------------------------------------
def render(request: web.Request, template: str, page: str, data: dict[str, Any]) -> web.Response:
    session: Session = request["ui_session"]
    resp = aiohttp_jinja2.render_template(template, request, {
        **data, "page": page, "user": session.user, "role": request["ui_role"], "csrf": session.csrf,
        "can_act": request["ui_role"] == "admin"})
    resp.headers["Cache-Control"] = "no-store"
    return resp


async def index(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther("/ui/rooms")


async def rooms(request: web.Request) -> web.Response:
    ctx: Context = request.app["ctx"]
    return render(request, "rooms.html", "rooms", rooms_view(ctx, [tile_of(h) for h in await host_states(ctx)]))


async def pc(request: web.Request) -> web.Response:
    ctx: Context = request.app["ctx"]
    data = await pc_view(ctx, request.match_info["ident"])
    if data is None:
        return render(request, "missing.html", "rooms", {"what": f"PC {request.match_info['ident']}"})
    return render(request, "pc.html", "rooms", data)


async def images(request: web.Request) -> web.Response:
    return render(request, "images.html", "images", await images_view(request.app["ctx"]))


async def audit(request: web.Request) -> web.Response:
    return render(request, "audit.html", "audit", audit_view(request.app["ctx"], request.query))


async def server(request: web.Request) -> web.Response:
    return render(request, "server.html", "server", await server_view(request.app["ctx"]))


# -- the live stream ---------------------------------------------------------------------------------------
def _sse(event: str, data: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: `tiles` (every PC first, then the ones that changed), `logout` when the login ends."""
    ctx: Context = request.app["ctx"]
    feed = ctx.service("feed")
    if not isinstance(feed, HostFeed):
        return _error(request, 503, "the live feed is not running")
    side = ui_side(ctx)
    session: Session = request["ui_session"]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    watcher, tiles = await feed.watch()
    try:
        await resp.write(b"retry: 2000\n" + _sse("tiles", tiles))
        while True:
            try:
                changed = await asyncio.wait_for(watcher.queue.get(), PING_EVERY)
            except asyncio.TimeoutError:
                changed = []
            if changed is None:  # fell behind, or bootd stops: the browser reconnects, from the full picture
                break
            if side.sessions.get(session.id) is None or side.admin.accounts.role(session.user) is None:
                await resp.write(_sse("logout", {}))
                break
            await resp.write(_sse("tiles", changed) if changed else b": ping\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        feed.unwatch(watcher)
    return resp


def setup_routes(app: web.Application, ctx: Context) -> None:
    env = aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader("bootd.ui", "templates"), autoescape=True,
                               undefined=jinja2.StrictUndefined)
    env.filters.update(_filters())
    app.router.add_get("/ui", index)
    app.router.add_get("/ui/", index)
    app.router.add_get("/ui/login", login_page)
    app.router.add_post("/ui/login", login)
    app.router.add_post("/ui/logout", logout)
    app.router.add_get("/ui/rooms", rooms)
    app.router.add_get("/ui/events", events, allow_head=False)
    app.router.add_get("/ui/pc/{ident}", pc)
    app.router.add_get("/ui/images", images)
    app.router.add_get("/ui/audit", audit)
    app.router.add_get("/ui/server", server)
    app.router.add_static("/ui/static/", STATIC, append_version=True)


def _filters() -> dict[str, Any]:
    def when(ts: Optional[float]) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"

    def secs(s: Optional[float]) -> str:
        return "-" if s is None else f"{s:.1f} s"

    return {"when": when, "size": human, "secs": secs}

