"""The one aiohttp server: the admin API on a Unix socket (and optionally TCP with a bearer token),
and boot files on the served interfaces' addresses.

Requests on the Unix socket are trusted (the socket's file mode is the access control, like
docker.sock); `/api/` and `/metrics` on TCP need `Authorization: Bearer <token>` and are only on the
API's TCP site; the boot port serves only boot paths. Components add routes through ROUTE_MODULES.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Optional

from aiohttp import web

from bootd.service import Service

log = logging.getLogger("bootd.http")

# Modules with `setup_routes(app, ctx)`. One line per component.
ROUTE_MODULES = [
    "bootd.http.api_core",
    "bootd.http.boot",  # menus/HTTP helper: boot files, /boot/<mac>.ipxe
    "bootd.http.menu_api",  # menus helper: GET /api/v1/hosts/{id}/menu (preview, starts no boot)
    "bootd.http.client_api",  # client helper: /clients/<mac>/ rendered jobs/units
    "bootd.http.snapshot_api",  # snapshot helper: images, snapshots, lifecycle, jobs, fsck
    "bootd.http.disk_api",  # NBD helper: /api/v1/disks (list, boot, reset, commit)
    "bootd.http.dhcp_api",  # DHCP helper: /api/v1/dhcp/leases, /api/v1/dhcp/reservations
]

SITE_KEY = web.AppKey("bootd_site_kind", dict)


def _site_kind(request: web.Request) -> str:
    """'unix', 'api' (API on TCP) or 'boot' (boot files on a served interface)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, (str, bytes)) or sockname is None:
        return "unix"
    kinds = request.app[SITE_KEY]
    return kinds.get((sockname[0], sockname[1]), kinds.get(("*", sockname[1]), "boot"))


def _is_admin_path(path: str) -> bool:
    return path.startswith("/api/") or path == "/metrics"


@web.middleware
async def access_middleware(request: web.Request, handler):
    kind = _site_kind(request)
    request["site"] = kind
    if _is_admin_path(request.path):
        if kind == "boot":
            return _json_error(404, "not found")
        if kind == "api":
            token = request.app["ctx"].extras.get("api_token")
            got = request.headers.get("Authorization", "")
            if not token or got != f"Bearer {token}":
                return _json_error(401, "missing or wrong bearer token")
    try:
        return await handler(request)
    except web.HTTPException as e:
        if _is_admin_path(request.path) and e.status >= 400 and e.content_type != "application/json":
            return _json_error(e.status, e.reason if not e.text or e.text.startswith(str(e.status)) else e.text)
        raise
    except Exception as e:  # a bad request must never take the daemon down
        log.exception("error handling %s %s", request.method, request.path)
        if _is_admin_path(request.path):
            return _json_error(500, f"internal error: {e}")
        raise


def _json_error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


def json_error(status: int, reason: str) -> web.HTTPException:
    """Raise this from an API handler: a 4xx with a JSON reason."""
    cls = {400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 403: web.HTTPForbidden,
           404: web.HTTPNotFound, 409: web.HTTPConflict, 422: web.HTTPUnprocessableEntity,
           507: web.HTTPInsufficientStorage, 503: web.HTTPServiceUnavailable}.get(status, web.HTTPBadRequest)
    return cls(text=json.dumps({"error": reason}), content_type="application/json")


async def read_json(request: web.Request) -> dict:
    """The request body as a JSON object, or a 400 that says why not."""
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise json_error(400, f"body is not valid JSON: {e}")
    if not isinstance(data, dict):
        raise json_error(400, "body must be a JSON object")
    return data


class HttpService(Service):
    name = "http"

    def __init__(self) -> None:
        self.runner: Optional[web.AppRunner] = None
        self.app: Optional[web.Application] = None
        self.ctx = None
        self.bound: list[str] = []
        self._signature = None

    def _make_app(self, ctx) -> web.Application:
        app = web.Application(middlewares=[access_middleware], client_max_size=4 * 1024 * 1024)
        app["ctx"] = ctx
        app[SITE_KEY] = {}
        for name in ROUTE_MODULES:
            importlib.import_module(name).setup_routes(app, ctx)
        return app

    @staticmethod
    def _signature_of(cfg) -> tuple:
        return (cfg.api.socket, cfg.api.socket_mode, cfg.api.tcp, cfg.api.token_file, cfg.http.enabled,
                cfg.http.port, cfg.http.idle_timeout, tuple((i.name, str(i.address)) for i in cfg.interfaces))

    async def start(self, ctx) -> None:
        self.ctx = ctx
        cfg = ctx.config
        self._signature = self._signature_of(cfg)
        if cfg.api.token_file:
            ctx.extras["api_token"] = Path(cfg.api.token_file).read_text().strip()
        self.app = self._make_app(ctx)
        self.runner = web.AppRunner(self.app, access_log=None, keepalive_timeout=cfg.http.idle_timeout,
                                    handle_signals=False, shutdown_timeout=1.0)
        await self.runner.setup()
        self.bound = []
        sock = Path(cfg.api.socket)
        sock.parent.mkdir(parents=True, exist_ok=True)
        if sock.exists() or sock.is_symlink():
            if stat.S_ISSOCK(sock.lstat().st_mode):
                sock.unlink()
            else:
                raise RuntimeError(f"{sock} exists and is not a socket")
        site = web.UnixSite(self.runner, str(sock))
        await site.start()
        os.chmod(sock, int(cfg.api.socket_mode, 8))
        self.bound.append(f"unix:{sock}")
        if cfg.api.tcp:
            host, _, port = cfg.api.tcp.rpartition(":")
            host = host.strip("[]")
            await web.TCPSite(self.runner, host, int(port), reuse_address=True).start()
            self.app[SITE_KEY][(host, int(port))] = "api"
            self.bound.append(f"api:{host}:{port}")
        if cfg.http.enabled:
            for iface in cfg.interfaces:
                host = str(iface.address.ip)
                await web.TCPSite(self.runner, host, cfg.http.port, reuse_address=True).start()
                self.app[SITE_KEY][(host, cfg.http.port)] = "boot"
                self.bound.append(f"boot:{host}:{cfg.http.port}")

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()
            self.runner = None
        if self.ctx is not None:
            try:
                Path(self.ctx.config.api.socket).unlink()
            except OSError:
                pass

    async def reload(self, ctx) -> None:
        # Routes read ctx.config at request time; only a change of sockets needs a restart.
        if self._signature_of(ctx.config) != self._signature:
            await self.stop()
            await self.start(ctx)
        self.ctx = ctx

    def status(self) -> dict:
        return {"listening": self.bound}
