"""Host registry API (issue 16): hosts as data beside the config's, and the unknown PCs that booted.

GET    /api/v1/host-registry                  every host in force (source config|registered), conflicts
GET    /api/v1/host-registry/unknown          PCs seen booting that no host entry names
POST   /api/v1/host-registry                  add {mac, name, group?, ip?}
POST   /api/v1/host-registry/adopt            adopt an unknown PC {mac, group?, name?, ip?}
POST   /api/v1/host-registry/import           {csv, dry_run?}: all rows or none, bad rows by line
PATCH  /api/v1/host-registry/{id}             rename / move / re-address {name?, group?, ip?}
DELETE /api/v1/host-registry/{id}             remove (id: MAC or name)
"""
from __future__ import annotations

import json
from typing import Any, Optional

from aiohttp import web

from bootd.hostregistry import HostNotFound, HostRegistryError, Registry
from bootd.http.app import json_error, read_json

routes = web.RouteTableDef()


def _refused(e: HostRegistryError) -> web.HTTPException:
    """A 400 whose reason lists every problem (one line each), and `problems` for scripts."""
    return web.HTTPBadRequest(text=json.dumps({"error": str(e), "summary": e.summary, "problems": e.problems}),
                              content_type="application/json")


def _text(body: dict[str, Any], key: str) -> Optional[str]:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise json_error(400, f"{key} must be a string")
    return value


async def _in_force(request: web.Request) -> None:
    """Hand the changed host list to the DHCP policy (built from the config; the others read it per call)."""
    ctx = request.app["ctx"]
    dhcp = ctx.service("dhcp")
    if dhcp is not None:
        await dhcp.reload(ctx)


@routes.get("/api/v1/host-registry")
async def list_hosts(request: web.Request) -> web.Response:
    return web.json_response(Registry(request.app["ctx"]).listing())


@routes.get("/api/v1/host-registry/unknown")
async def unknown_hosts(request: web.Request) -> web.Response:
    return web.json_response({"unknown": Registry(request.app["ctx"]).unknown()})


@routes.post("/api/v1/host-registry")
async def add_host(request: web.Request) -> web.Response:
    body = await read_json(request)
    try:
        row = Registry(request.app["ctx"]).add(_text(body, "mac") or "", _text(body, "name") or "",
                                               _text(body, "group"), _text(body, "ip"))
    except HostRegistryError as e:
        raise _refused(e) from None
    await _in_force(request)
    return web.json_response(row.as_dict(), status=201)


@routes.post("/api/v1/host-registry/adopt")
async def adopt_host(request: web.Request) -> web.Response:
    body = await read_json(request)
    try:
        row = Registry(request.app["ctx"]).adopt(_text(body, "mac") or "", _text(body, "group"),
                                                 _text(body, "name"), _text(body, "ip"))
    except HostNotFound as e:
        raise json_error(404, str(e)) from None
    except HostRegistryError as e:
        raise _refused(e) from None
    await _in_force(request)
    return web.json_response(row.as_dict(), status=201)


@routes.post("/api/v1/host-registry/import")
async def import_hosts(request: web.Request) -> web.Response:
    body = await read_json(request)
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise json_error(400, "dry_run must be true or false")
    try:
        result = Registry(request.app["ctx"]).import_csv(_text(body, "csv") or "", dry_run=dry_run)
    except HostRegistryError as e:
        raise _refused(e) from None
    if not dry_run:
        await _in_force(request)
    return web.json_response(result)


@routes.patch("/api/v1/host-registry/{id}")
async def change_host(request: web.Request) -> web.Response:
    body = await read_json(request)
    group, ip = _text(body, "group"), _text(body, "ip")
    try:
        row = Registry(request.app["ctx"]).change(request.match_info["id"], name=_text(body, "name"),
                                                  group=group or None, ip=ip or None,
                                                  clear_group=group == "", clear_ip=ip == "")
    except HostNotFound as e:
        raise json_error(404, str(e)) from None
    except HostRegistryError as e:
        raise _refused(e) from None
    await _in_force(request)
    return web.json_response(row.as_dict())


@routes.delete("/api/v1/host-registry/{id}")
async def remove_host(request: web.Request) -> web.Response:
    try:
        row = Registry(request.app["ctx"]).remove(request.match_info["id"])
    except HostNotFound as e:
        raise json_error(404, str(e)) from None
    await _in_force(request)
    return web.json_response({"removed": row.as_dict()})


def setup_routes(app: web.Application, ctx: Any) -> None:
    app.add_routes(routes)
