"""Wake-on-LAN API: POST /api/v1/wake {"hosts": [...], "group": "room1"} queues magic packets (bootd/wake.py)
and answers 202 with the job at once; GET /api/v1/wake/{id} follows it."""
from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from bootd.http.api_core import find_host
from bootd.http.app import json_error, read_json
from bootd.wake import WakeTarget, plan_targets, wake_queue

if TYPE_CHECKING:
    from bootd.daemon import Context

routes = web.RouteTableDef()


def _host_targets(ctx: "Context", ident: str) -> list[WakeTarget]:
    """The packets for one host named or with that MAC (a 404 with the reason if there is none)."""
    row = find_host(ctx, ident)
    addresses = ([row["ip"]] if row["ip"] else []) + ctx.store.bound_ips(row["mac"])
    return plan_targets(ctx.config, row["name"], row["mac"], addresses)


def _group_targets(ctx: "Context", group: str) -> list[WakeTarget]:
    if ctx.config.group(group) is None:
        raise json_error(404, f"no group named {group!r}")
    hosts = [h for h in ctx.config.hosts if h.group == group]
    if not hosts:
        raise json_error(404, f"group {group!r} has no hosts")
    out: list[WakeTarget] = []
    for h in hosts:
        addresses = ([str(h.ip)] if h.ip else []) + ctx.store.bound_ips(h.mac)
        out += plan_targets(ctx.config, h.name, h.mac, addresses)
    return out


@routes.post("/api/v1/wake")
async def wake(request: web.Request) -> web.Response:
    ctx = request.app["ctx"]
    body = await read_json(request)
    hosts = body.get("hosts", [])
    group = body.get("group")
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise json_error(400, "hosts must be a list of host names or MACs")
    if group is not None and (not isinstance(group, str) or not group):
        raise json_error(400, "group must be a group name")
    if not hosts and group is None:
        raise json_error(400, "name hosts or a group to wake")
    if not ctx.config.interfaces:
        raise json_error(409, "no served interfaces to send magic packets on")
    targets: list[WakeTarget] = []
    for ident in hosts:  # every name is checked before anything is queued: all or nothing
        targets += _host_targets(ctx, ident)
    if group is not None:
        targets += _group_targets(ctx, group)
    unique: list[WakeTarget] = []  # a host named twice (and in the group) still gets one packet per link
    seen: set[tuple[str, str]] = set()
    for t in targets:
        if (t.mac, t.interface) not in seen:
            seen.add((t.mac, t.interface))
            unique.append(t)
    queue = wake_queue(ctx)
    job = queue.submit(unique)
    return web.json_response(job.as_dict(queue.rate), status=202)


@routes.get("/api/v1/wake/{job}")
async def wake_job(request: web.Request) -> web.Response:
    ctx = request.app["ctx"]
    try:
        job_id = int(request.match_info["job"])
    except ValueError:
        raise json_error(400, "a wake job id is a whole number") from None
    queue = wake_queue(ctx)
    job = queue.job(job_id)
    if job is None:
        raise json_error(404, f"no wake job {job_id} (finished jobs are kept for the last 50 requests)")
    return web.json_response(job.as_dict(queue.rate))


def setup_routes(app: web.Application, ctx: "Context") -> None:
    app.add_routes(routes)
