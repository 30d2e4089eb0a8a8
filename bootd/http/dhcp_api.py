"""DHCP admin API: the lease table and run-time address reservations."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional

from aiohttp import web

from bootd.http.app import json_error, read_json

if TYPE_CHECKING:
    from bootd.daemon import Context
    from bootd.dhcp.leases import LeaseDict
    from bootd.dhcp.server import DhcpService

routes = web.RouteTableDef()


def _service(request: web.Request) -> DhcpService:
    svc: Optional[DhcpService] = request.app["ctx"].service("dhcp")
    if svc is None or svc.leases is None:
        raise json_error(503, "the DHCP service is not running")
    return svc


def lease_rows(svc: DhcpService, show_all: bool, now: float) -> list[LeaseDict]:
    """The leases (only those in force unless `show_all`), by address: the API and the dashboard."""
    table = svc.leases
    if table is None:
        return []
    rows = [lease.as_dict() for lease in table.by_ip.values() if show_all or lease.expires > now]
    rows.sort(key=lambda r: tuple(int(x) for x in r["ip"].split(".")))
    return rows


@routes.get("/api/v1/dhcp/leases")
async def leases(request: web.Request) -> web.Response:
    now = time.time()
    show_all = request.query.get("all", "") in ("1", "true", "yes")
    return web.json_response({"leases": lease_rows(_service(request), show_all, now), "now": now})


@routes.get("/api/v1/dhcp/reservations")
async def reservations(request: web.Request) -> web.Response:
    return web.json_response({"reservations": _service(request).reservations()})


@routes.post("/api/v1/dhcp/reservations")
async def reserve(request: web.Request) -> web.Response:
    svc = _service(request)
    body = await read_json(request)
    try:
        row = svc.add_reservation(str(body.get("mac", "")), str(body.get("ip", "")), body.get("name"))
    except LookupError as e:
        raise json_error(409, str(e)) from None
    except ValueError as e:
        raise json_error(400, str(e)) from None
    return web.json_response(row, status=201)


@routes.delete("/api/v1/dhcp/reservations/{mac}")
async def unreserve(request: web.Request) -> web.Response:
    svc = _service(request)
    try:
        gone = svc.remove_reservation(request.match_info["mac"])
    except ValueError as e:
        raise json_error(400, str(e)) from None
    if not gone:
        raise json_error(404, "no run-time reservation for that MAC")
    return web.json_response({"removed": request.match_info["mac"]})


def setup_routes(app: web.Application, ctx: Context) -> None:
    app.add_routes(routes)
