"""A host's rendered client files over HTTP, rendered at request time from the config in force.

Boot side (what the client's init fetches):
  GET /clients/                    hosts that have clients settings, one MAC per line
  GET /clients/<mac>/              the host's files, one name per line (easy for a shell loop)
  GET /clients/<mac>/index.json    the same with what each instance boots (disk, port, VT)
  GET /clients/<mac>/<file>        one rendered job or unit
  POST /clients/<mac>/status       the client root reports its screen: {"state": "started", "units":
                                   [...]} or {"state": "failed", "reason": "..."} (a boot event, so
                                   `bootctl hosts` and the dashboard say why a PC shows no screen)
Admin side: GET /api/v1/clients/<host>/render (host = MAC or name) -> index plus every file's text.
"""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from aiohttp import web

from bootd.clientconfig.model import ClientsConfig
from bootd.clientconfig.render import RenderError
from bootd.clientconfig.resolve import NoClientConfig, RenderedHost, UnknownHost, clients_for, render_for
from bootd.hoststate import host_name, record_failure
from bootd.http.app import json_error
from bootd.macaddr import parse_mac
from bootd.peers import may_act_for, refuse

if TYPE_CHECKING:
    from bootd.daemon import Context

routes = web.RouteTableDef()
NO_STORE = {"Cache-Control": "no-store"}  # rendered per request: a new boot means a new export token


def _owner_check(request: web.Request, key: str) -> str:
    """A host's files go only to that host: the key (a MAC in any spelling, or a configured name) is
    resolved to the host's MAC first, and then the asking address must be that MAC's (bootd/peers.py).
    A key that names no host at all is a 404 that says nothing about anyone. Returns the MAC."""
    ctx = request.app["ctx"]
    mac = parse_mac(key)
    if mac is None:
        host = ctx.config.host_by_name(key)
        if host is None:
            ctx.metrics.inc("clients", "errors", reason="unknown-host")
            raise web.HTTPNotFound(text="unknown host\n")
        mac = host.mac
    if not may_act_for(ctx, request.remote, mac, request.get("site", "boot")):
        refuse(ctx, "clients", request.remote, mac, "client configs")
        raise web.HTTPForbidden(text="these files belong to another host\n")
    return mac


async def _render(request: web.Request, key: str, api: bool) -> RenderedHost:
    ctx = request.app["ctx"]
    if not api:
        key = _owner_check(request, key)
    try:
        return await render_for(ctx, key)
    except UnknownHost as e:
        ctx.metrics.inc("clients", "errors", reason="unknown-host")
        if api:
            raise json_error(404, str(e)) from None
        raise web.HTTPNotFound(text=f"{e}\n") from None
    except NoClientConfig as e:
        ctx.metrics.inc("clients", "errors", reason="no-config")
        if api:
            raise json_error(404, str(e)) from None
        raise web.HTTPNotFound(text=f"{e}\n") from None
    except (RenderError, ValueError) as e:
        ctx.metrics.inc("clients", "errors", reason="render")
        if api:
            raise json_error(409, f"cannot render: {e}") from None
        raise web.HTTPConflict(text=f"cannot render: {e}\n") from None


def _record(ctx: Context, mac: str, kind: str, detail: dict[str, object], nbytes: int | None = None) -> None:
    """One boot event; an event log problem must not keep a client from its files or its boot."""
    try:
        ctx.store.record_event(mac, kind, detail, nbytes=nbytes)
    except Exception:
        pass


@routes.get("/clients/")
async def hosts_index(request: web.Request) -> web.Response:
    cfg = request.app["ctx"].config
    macs = []
    for hc in cfg.hosts:
        c = clients_for(cfg, hc)
        if isinstance(c, ClientsConfig) and c.instances:
            macs.append(hc.mac)
    return web.Response(text="".join(f"{m}/\n" for m in macs), content_type="text/plain", headers=NO_STORE)


@routes.get("/clients/{mac}/")
async def host_index(request: web.Request) -> web.Response:
    r = await _render(request, request.match_info["mac"], api=False)
    return web.Response(text="".join(f"{n}\n" for n in r.files), content_type="text/plain", headers=NO_STORE)


@routes.get("/clients/{mac}/index.json")
async def host_index_json(request: web.Request) -> web.Response:
    r = await _render(request, request.match_info["mac"], api=False)
    return web.json_response(r.index(), headers=NO_STORE)


@routes.get("/clients/{mac}/{file}")
async def host_file(request: web.Request) -> web.Response:
    r = await _render(request, request.match_info["mac"], api=False)
    name = request.match_info["file"]
    text = r.files.get(name)
    if text is None:
        raise web.HTTPNotFound(text=f"no file {name!r} for {r.host.mac}\n")
    ctx = request.app["ctx"]
    ctx.metrics.inc("clients", "served")
    _record(ctx, r.host.mac, "config", {"file": name, "via": "http", "peer": request.remote}, len(text.encode()))
    return web.Response(text=text, content_type="text/plain", headers=NO_STORE)


STATUS_MAX_BYTES = 4096
REASON_MAX = 300
_UNIT_RE = re.compile(r"[A-Za-z0-9@._-]{1,64}")


def parse_status(body: bytes) -> dict:
    """A client root's status report -> {"state": "started", "units": [...]} or {"state": "failed",
    "reason": "..."}; ValueError with what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the body is not JSON") from None
    if not isinstance(data, dict) or data.get("state") not in ("started", "failed"):
        raise ValueError('"state" must be "started" or "failed"')
    if data["state"] == "started":
        units = data.get("units", [])
        if not isinstance(units, list) or len(units) > 64 or not all(
                isinstance(u, str) and _UNIT_RE.fullmatch(u) for u in units):
            raise ValueError('"units" must be a list of at most 64 unit names')
        return {"state": "started", "units": units}
    reason = data.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError('a failed report needs a "reason"')
    reason = "".join(c if c.isprintable() else " " for c in reason.strip())[:REASON_MAX]
    return {"state": "failed", "reason": reason}


@routes.post("/clients/{mac}/status")
async def host_status(request: web.Request) -> web.Response:
    ctx = request.app["ctx"]
    mac = _owner_check(request, request.match_info["mac"])
    body = await request.content.read(STATUS_MAX_BYTES + 1)  # never more, whatever the body says it is
    if len(body) > STATUS_MAX_BYTES:
        ctx.metrics.inc("clients", "errors", reason="status")
        raise web.HTTPRequestEntityTooLarge(max_size=STATUS_MAX_BYTES, actual_size=len(body),
                                            text=f"a status report is at most {STATUS_MAX_BYTES} bytes\n")
    try:
        report = parse_status(body)
    except ValueError as e:
        ctx.metrics.inc("clients", "errors", reason="status")
        raise web.HTTPBadRequest(text=f"{e}\n") from None
    ctx.metrics.inc("clients", "reports", state=report["state"])
    if report["state"] == "started":
        _record(ctx, mac, "client", {"state": "started", "units": report["units"], "peer": request.remote})
    else:
        record_failure(ctx.store, mac, "client", f"the PC's screen did not come up: {report['reason']}",
                       host=host_name(ctx, mac), peer=request.remote)
    return web.Response(status=204)


@routes.get("/api/v1/clients/{host}/render")
async def api_render(request: web.Request) -> web.Response:
    r = await _render(request, request.match_info["host"], api=True)
    return web.json_response({**r.index(), "names": list(r.files), "files": r.files})


def setup_routes(app: web.Application, ctx: Context) -> None:
    app.add_routes(routes)
