"""Core admin API: status, reload, metrics, hosts (state, last error) and their boot timelines, rooms."""
from __future__ import annotations

import asyncio
import os
import shutil
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bootd import __version__
from bootd.hoststate import disk_connections, host_rows, host_states, room_summary, with_state
from bootd.http.app import json_error
from bootd.macaddr import parse_mac
from bootd.metrichistory import MetricHistory
from snapshots.errors import SnapshotError

if TYPE_CHECKING:
    from bootd.daemon import Context

routes = web.RouteTableDef()


def _interfaces(ctx: Context) -> list[dict[str, str]]:
    out = []
    for iface in ctx.config.interfaces:
        state = "unknown"
        try:
            with open(f"/sys/class/net/{iface.name}/operstate") as f:
                state = f.read().strip()
        except OSError:
            state = "absent"
        out.append({"name": iface.name, "address": str(iface.address), "state": state})
    return out


def _storage(ctx: Context) -> dict[str, object]:
    try:
        usage = shutil.disk_usage(ctx.config.storage_dir)
    except OSError as e:
        return {"path": str(ctx.config.storage_dir), "error": str(e)}
    return {"path": str(ctx.config.storage_dir), "total_bytes": usage.total, "free_bytes": usage.free}


def status_of(ctx: Context) -> dict[str, Any]:
    """What GET /api/v1/status answers (bootctl status, the dashboard's Server page)."""
    now = time.time()
    return {
        "version": __version__,
        "pid": os.getpid(),
        "started_at": ctx.started_at,
        "uptime": round(now - ctx.started_at, 3),
        "config_path": ctx.config_path,
        "dhcp_mode": ctx.config.dhcp.mode,
        "interfaces": _interfaces(ctx),
        "services": [{"name": s.name, **s.status()} for s in ctx.services],
        "warnings": [f"{s.name}: {w}" for s in ctx.services if (w := s.warning())],
        "last_reload": ctx.last_reload,
        "reload_errors": ctx.reload_errors,
        "storage": str(ctx.config.storage_dir),
        "storage_space": _storage(ctx),
    }


@routes.get("/api/v1/status")
async def status(request: web.Request) -> web.Response:
    return web.json_response(status_of(request.app["ctx"]))


@routes.post("/api/v1/reload")
async def reload(request: web.Request) -> web.Response:
    ctx = request.app["ctx"]
    start_reload = ctx.request_reload
    if start_reload is None:
        raise json_error(503, "reload is not available")
    # The reload runs in a task of its own (it may replace the very server handling this request);
    # shielded, so a client that hangs up does not cancel it halfway.
    applied = await asyncio.shield(start_reload())
    return web.json_response({"applied": applied, "errors": ctx.reload_errors}, status=200 if applied else 422)


@routes.get("/api/v1/metrics")
async def metrics_json(request: web.Request) -> web.Response:
    return web.json_response(request.app["ctx"].metrics.snapshot())


@routes.get("/api/v1/metrics/history")
async def metrics_history(request: web.Request) -> web.Response:
    """Bytes per second served over TFTP, HTTP and NBD, sampled over the last hour (bootd/metrichistory.py)."""
    svc = request.app["ctx"].service("history")
    if not isinstance(svc, MetricHistory):
        raise json_error(503, "the metric history is not running")
    return web.json_response(svc.history())


@routes.get("/api/v1/audit")
async def audit(request: web.Request) -> web.Response:
    """Who changed what (snapshot store): ?actor= and ?target= match a part, ?action= and ?image= the whole."""
    ctx = request.app["ctx"]
    if ctx.snapshots is None:
        raise json_error(503, "the snapshot store is not running")
    q = request.query
    limit = _limit(q.get("limit", "200"))
    try:
        rows = ctx.snapshots.audit_log(q.get("image") or None, limit, q.get("actor") or None,
                                       q.get("action") or None, q.get("target") or None)
    except SnapshotError as e:
        raise json_error(e.status, str(e)) from None
    return web.json_response({"audit": rows})


def _limit(value: str) -> int:
    try:
        limit = int(value)
    except ValueError:
        raise json_error(400, "limit must be a whole number") from None
    if not 0 < limit <= 10000:
        raise json_error(400, "limit must be between 1 and 10000")
    return limit


@routes.get("/metrics")
async def metrics_prom(request: web.Request) -> web.Response:
    return web.Response(text=request.app["ctx"].metrics.prometheus(), content_type="text/plain")


def find_host(ctx: Context, ident: str) -> dict[str, Any]:
    """A host by name or MAC (configured or only seen), or a 404 that says so."""
    mac = parse_mac(ident)
    for row in host_rows(ctx):
        if (mac is not None and row["mac"] == mac) or row["name"] == ident:
            return row
    raise json_error(404, f"no host named or with MAC {ident!r}")


@routes.get("/api/v1/hosts")
async def hosts(request: web.Request) -> web.Response:
    return web.json_response({"hosts": await host_states(request.app["ctx"])})


@routes.get("/api/v1/rooms")
async def rooms(request: web.Request) -> web.Response:
    """Per room (config group): PCs per state, how many are up on which snapshot, which failed."""
    return web.json_response({"rooms": await room_summary(request.app["ctx"])})


@routes.get("/api/v1/hosts/{ident}")
async def host(request: web.Request) -> web.Response:
    ctx = request.app["ctx"]
    row = find_host(ctx, request.match_info["ident"])
    limit = _limit(request.query.get("limit", "200"))
    disk = (await disk_connections(ctx)).get(row["mac"])
    row = with_state(ctx, row, disk)
    row["events"] = ctx.store.events(row["mac"], limit=limit)
    # several servers on one database: which one served each event (each carries `server`), newest last
    row["servers"] = list(dict.fromkeys(e["server"] for e in row["events"] if e.get("server")))
    return web.json_response(row)


@routes.get("/api/v1/servers")
async def servers(request: web.Request) -> web.Response:
    """The bootd servers sharing this state (bootd/cluster.py): heartbeat age, which one answers DHCP."""
    ctx = request.app["ctx"]
    rows = await asyncio.to_thread(ctx.store.servers)
    beat = ctx.config.state.heartbeat
    this = ctx.cluster.server_name if ctx.cluster is not None else None
    for r in rows:
        r["heartbeat_age"] = round(max(0.0, r["now"] - r["heartbeat"]), 3)
        # with SQLite a server writes its row every 30 s (nobody takes over from it)
        r["alive"] = r["name"] == this or r["heartbeat_age"] <= (3 * beat if ctx.store.dialect != "sqlite" else 90.0)
        r["this"] = r["name"] == this
    return web.json_response({"servers": rows, "shared_state": ctx.store.dialect != "sqlite",
                              "state": ctx.store.location, "dhcp_takeover": ctx.config.state.dhcp_takeover})


def setup_routes(app: web.Application, ctx: Context) -> None:
    app.add_routes(routes)
