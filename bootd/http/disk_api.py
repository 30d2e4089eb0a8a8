"""Admin API for hosts' NBD disks: list, prepare a boot by hand, reset, commit (NBD helper)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bootd.http.app import json_error
from bootd.seams import Disks
from nbdexport.errors import DiskError
from snapshots.errors import SnapshotError

if TYPE_CHECKING:
    from bootd.daemon import Context

routes = web.RouteTableDef()


def _disks(request: web.Request) -> tuple[Context, Disks]:
    ctx: Context = request.app["ctx"]
    if ctx.disks is None:
        svc = ctx.service("disks")
        reason = (svc.status().get("reason") if svc is not None else None) or "not running"
        raise json_error(503, f"disks over NBD are off: {reason}")
    return ctx, ctx.disks


def _mac(ctx: Context, host: str) -> str:
    """A host given by configured name, by a name in the hosts table, or by MAC."""
    cfg = ctx.config.host_by_name(host)
    if cfg is not None:
        return cfg.mac
    for mac in ctx.store.macs_named(host):
        return mac
    from nbdexport.model import norm_mac
    try:
        return norm_mac(host)
    except DiskError:
        raise json_error(404, f"unknown host {host!r} (not a configured name, a known name or a MAC)") from None


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except ValueError:
        raise json_error(400, "body is not JSON") from None
    if not isinstance(data, dict):
        raise json_error(400, "body must be a JSON object")
    return data


@routes.get("/api/v1/disks")
async def list_disks(request: web.Request) -> web.Response:
    ctx, disks = _disks(request)
    entries = await disks.list()
    return web.json_response({"disks": entries, "space": disks.space().as_dict(), "now": time.time(),
                              "storage_daemon": disks.qsd.status()})


@routes.get("/api/v1/disks/{host}")
async def one_disk(request: web.Request) -> web.Response:
    ctx, disks = _disks(request)
    mac = _mac(ctx, request.match_info["host"])
    entries = [e for e in await disks.list() if e["mac"] == mac]
    if not entries:
        raise json_error(404, f"{mac} has no disk")
    return web.json_response({"disks": entries})


@routes.post("/api/v1/disks/{host}/boot")
async def boot_disk(request: web.Request) -> web.Response:
    """What the menu does at a host's boot, by hand: a fresh disk over `snapshot` (default: the host's)."""
    ctx, disks = _disks(request)
    mac = _mac(ctx, request.match_info["host"])
    body = await _body(request)
    snapshot = body.get("snapshot")
    try:
        if snapshot is not None and ctx.snapshots is not None and not str(snapshot).startswith("/"):
            snapshot = ctx.snapshots.resolve(snapshot)
        t0 = time.monotonic()
        exp = await disks.prepare_boot(mac, snapshot)
    except (DiskError, SnapshotError) as e:  # SnapshotError: the snapshot store's NotFound and friends
        raise json_error(e.status, str(e)) from None
    return web.json_response({**exp.as_dict(), "ms": round((time.monotonic() - t0) * 1000, 2)})


@routes.post("/api/v1/disks/{host}/reset")
async def reset_disk(request: web.Request) -> web.Response:
    ctx, disks = _disks(request)
    mac = _mac(ctx, request.match_info["host"])
    body = await _body(request)
    try:  # dry_run: only the plan, what a reset would remove (bootctl shows it and asks for --yes)
        return web.json_response(await disks.reset(mac, dry_run=bool(body.get("dry_run"))))
    except DiskError as e:
        raise json_error(e.status, str(e)) from None


@routes.post("/api/v1/disks/{host}/commit")
async def commit_disk(request: web.Request) -> web.Response:
    ctx, disks = _disks(request)
    mac = _mac(ctx, request.match_info["host"])
    body = await _body(request)
    try:
        return web.json_response(await disks.commit(mac, note=str(body.get("note", "")), force=bool(body.get("force"))))
    except (DiskError, SnapshotError) as e:  # SnapshotError: the store refused the draft
        raise json_error(e.status, str(e)) from None


def setup_routes(app: web.Application, ctx: Context) -> None:
    app.add_routes(routes)
