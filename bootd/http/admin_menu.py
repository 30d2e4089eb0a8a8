"""Admin accounts over the API (bootctl admin) and the admin menu a PC's iPXE fetches (issue 17).

GET    /api/v1/admins                     the accounts (names and dates; never hashes)
POST   /api/v1/admins                     add {name, password, actor?}
PUT    /api/v1/admins/{name}/password     change {password}
DELETE /api/v1/admins/{name}              remove

Passwords are hashed here (argon2id, bootd/admins.py) and never logged: the access log has paths
only, and these paths carry no secret.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bootd.admins import Accounts, AdminError, AdminGate, NonceBook
from bootd.http.app import json_error, read_json

if TYPE_CHECKING:
    from bootd.daemon import Context

log = logging.getLogger("bootd.admin")


class AdminSide:
    """The one set of accounts, lock-out counts and open nonces of this process."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.accounts = Accounts(ctx.store)
        self.gate = AdminGate(self.accounts)
        self.nonces = NonceBook()


ADMIN_KEY: web.AppKey[AdminSide] = web.AppKey("bootd_admin_side", AdminSide)
routes = web.RouteTableDef()


def _side(request: web.Request) -> AdminSide:
    return request.app[ADMIN_KEY]


def _password(body: dict[str, Any]) -> str:
    value = body.get("password")
    if not isinstance(value, str):
        raise json_error(400, "password (a string) is required")
    return value


def _actor(request: web.Request, body: dict[str, Any]) -> str:
    from bootd.http.snapshot_api import actor_of
    return actor_of(request, body)


@routes.get("/api/v1/admins")
async def list_admins(request: web.Request) -> web.Response:
    return web.json_response({"admins": _side(request).accounts.list()})


@routes.post("/api/v1/admins")
async def add_admin(request: web.Request) -> web.Response:
    body = await read_json(request)
    name = body.get("name")
    if not isinstance(name, str):
        raise json_error(400, "name (a string) is required")
    accounts = _side(request).accounts
    try:
        accounts.add(name, _password(body), by=_actor(request, body))
    except AdminError as e:
        raise json_error(409 if "exists" in str(e) else 400, str(e)) from None
    log.info("admin account %s added by %s", name, _actor(request, body))
    return web.json_response({"name": name}, status=201)


@routes.put("/api/v1/admins/{name}/password")
async def change_password(request: web.Request) -> web.Response:
    body = await read_json(request)
    name = request.match_info["name"]
    try:
        _side(request).accounts.passwd(name, _password(body))
    except AdminError as e:
        raise json_error(404 if "no admin" in str(e) else 400, str(e)) from None
    log.info("admin account %s: password changed by %s", name, _actor(request, body))
    return web.json_response({"name": name})


@routes.delete("/api/v1/admins/{name}")
async def remove_admin(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    try:
        _side(request).accounts.remove(name)
    except AdminError as e:
        raise json_error(404, str(e)) from None
    log.info("admin account %s removed by %s", name, _actor(request, dict(request.query)))
    return web.json_response({"name": name, "removed": True})


def setup_routes(app: web.Application, ctx: Context) -> None:
    app[ADMIN_KEY] = AdminSide(ctx)
    app.add_routes(routes)

