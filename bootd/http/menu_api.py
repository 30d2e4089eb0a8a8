"""Admin API: what a host's menu looks like now, in any flavour, without starting a boot."""
from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from bootd.http.api_core import find_host
from bootd.http.app import json_error
from pxe.booter import RENDERERS, Booter, render

if TYPE_CHECKING:
    from bootd.daemon import Context


async def host_menu(request: web.Request) -> web.Response:
    ctx = request.app["ctx"]
    row = find_host(ctx, request.match_info["ident"])
    flavour = request.query.get("flavour") or ctx.planner.settings_for(row["mac"]).boot
    if flavour not in RENDERERS:
        raise json_error(400, f"unknown flavour {flavour!r}: use {', '.join(RENDERERS)}")
    booter = ctx.booter or Booter(ctx)
    server = request.query.get("server") or None
    menu = await booter.menu_for(row["mac"], server, new_boot=False, preview=True)
    return web.json_response({
        "host": row["name"], "mac": row["mac"], "flavour": flavour, "title": menu.title,
        "timeout": menu.timeout, "default": menu.default, "notes": list(menu.notes),
        "items": [{"key": it.key, "title": it.title, "kind": it.kind, "image": it.image,
                   "snapshot_id": it.snapshot_id, "version": it.version, "previous": it.previous,
                   "kernel": it.kernel, "initrd": it.initrd, "cmdline": it.cmdline,
                   "default": it.key == menu.default} for it in menu.items],
        "text": render(menu, flavour),
    })


def setup_routes(app: web.Application, ctx: Context) -> None:
    app.router.add_get("/api/v1/hosts/{ident}/menu", host_menu)
