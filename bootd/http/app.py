"""The one aiohttp server: the admin API on a Unix socket (and optionally TCP with a bearer token),
and boot files on the served interfaces' addresses.

Requests on the Unix socket are trusted (the socket's file mode is the access control, like
docker.sock); `/api/` and `/metrics` on TCP need `Authorization: Bearer <token>` and are only on the
API's TCP site; the boot port serves only boot paths. The dashboard's site (`ui.listen`) serves `/ui/` and
`/api/v1/` behind its login (bootd/ui/web.py `gate`) and nothing else. Components add routes in
`route_modules()`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import stat
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from aiohttp import web
from aiohttp.typedefs import Handler

from bootd.service import Service

if TYPE_CHECKING:
    from bootd.config import Config
    from bootd.daemon import Context

log = logging.getLogger("bootd.http")


def _mtime(path: Optional[str]) -> Optional[float]:
    """A renewed certificate is a changed signature: `bootctl reload` serves it."""
    try:
        return os.stat(path).st_mtime if path else None
    except OSError:
        return None


def route_modules() -> list[types.ModuleType]:
    """The modules with `setup_routes(app, ctx)`, imported by name here (not looked up from strings), so a
    missing or broken one fails at the import. One line per component. Imported at call time: each of them
    imports this module's helpers (json_error, read_json)."""
    from bootd.http import (
        admin_menu,
        api_core,
        backup_api,
        boot,
        client_api,
        dhcp_api,
        disk_api,
        host_api,
        menu_api,
        openapi,
        snapshot_api,
        wake_api,
    )
    from bootd.ui import web as ui_web
    return [
        api_core,
        boot,  # menus/HTTP helper: boot files, /boot/<mac>.ipxe
        menu_api,  # menus helper: GET /api/v1/hosts/{id}/menu (preview, starts no boot)
        client_api,  # client helper: /clients/<mac>/ rendered jobs/units
        snapshot_api,  # snapshot helper: images, snapshots, lifecycle, jobs, fsck
        disk_api,  # NBD helper: /api/v1/disks (list, boot, reset, commit)
        dhcp_api,  # DHCP helper: /api/v1/dhcp/leases, /api/v1/dhcp/reservations
        wake_api,  # issue 16: POST /api/v1/wake (Wake-on-LAN, paced), GET /api/v1/wake/{job}
        backup_api,  # issue 16: POST /api/v1/backup (online copy of state.db)
        host_api,  # issue 16: /api/v1/host-registry (bootctl host: registered and unknown hosts)
        admin_menu,  # issue 17: /api/v1/admins (bootctl admin), /boot/admin/<mac>.ipxe (admin menu at the PC)
        openapi,  # issue 18: GET /api/v1/openapi.json, the API's description
        ui_web,  # issue 18: the dashboard's pages under /ui/ (only on ui.listen)
    ]


SITE_KEY: web.AppKey[dict[tuple[str, int], str]] = web.AppKey("bootd_site_kind", dict)  # (host, port) -> kind
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "*")  # api.tcp hosts that listen on every address
RETIRE_GRACE = 30.0  # seconds a replaced server gets to finish its requests (the reload call itself, downloads)


def _site_kind(request: web.Request) -> str:
    """'unix', 'api' (API on TCP) or 'boot' (boot files on a served interface).

    A site listening on a wildcard address is registered as ("*", port): its connections arrive on a
    concrete local address (127.0.0.1, the interface's), never on 0.0.0.0."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, (str, bytes)) or sockname is None:
        return "unix"
    kinds = request.app[SITE_KEY]
    return kinds.get((sockname[0], sockname[1]), kinds.get(("*", sockname[1]), "boot"))


def split_hostport(value: str) -> tuple[str, int]:
    """"HOST:PORT" / "[V6]:PORT" -> (host without brackets, port); validated by the config."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def _is_admin_path(path: str) -> bool:
    return path.startswith("/api/") or path == "/metrics"


def is_ui_path(path: str) -> bool:
    return path == "/ui" or path.startswith("/ui/")


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    kind = _site_kind(request)
    request["site"] = kind
    if kind == "ui":  # the dashboard's listener: its pages and the API, both behind its login (bootd/ui)
        from bootd.ui.web import gate
        refused = await gate(request)
        if refused is not None:
            return refused
    elif is_ui_path(request.path):
        return _json_error(404, "not found") if kind != "boot" else web.Response(status=404, text="not found")
    if _is_admin_path(request.path):
        if kind == "boot":
            return _json_error(404, "not found")
        if kind == "api":
            token = request.app["ctx"].api_token
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


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says why not."""
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise json_error(400, f"body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise json_error(400, "body must be a JSON object")
    return data


ListenerKey = Union[tuple[Literal["unix"], str], tuple[Literal["tcp"], str, int]]
"""Where a socket listens: ("unix", path) or ("tcp", host, port)."""


@dataclass
class _Listener:
    """One listening socket: where (`key`), what it serves (`kind`) and the socket itself."""

    key: ListenerKey
    kind: str  # unix | api | boot
    sock: socket.socket
    temp_path: Optional[str] = None  # a new unix socket bound here, renamed onto its path once serving


@dataclass
class _Server:
    """An app with its runner and listening sockets: what one config's HTTP settings serve."""

    app: web.Application
    runner: web.AppRunner
    listeners: dict[ListenerKey, _Listener] = field(default_factory=dict)
    bound: list[str] = field(default_factory=list)


class HttpService(Service):
    name = "http"

    def __init__(self) -> None:
        self.server: Optional[_Server] = None
        self.ctx: Optional[Context] = None
        self._signature: Optional[tuple[object, ...]] = None
        self._retiring: set[asyncio.Task[None]] = set()  # replaced servers finishing their requests

    @property
    def runner(self) -> Optional[web.AppRunner]:
        return self.server.runner if self.server else None

    @property
    def app(self) -> Optional[web.Application]:
        return self.server.app if self.server else None

    @property
    def bound(self) -> list[str]:
        return self.server.bound if self.server else []

    def _make_app(self, ctx: Context) -> web.Application:
        app = web.Application(middlewares=[access_middleware], client_max_size=4 * 1024 * 1024)
        app["ctx"] = ctx
        app[SITE_KEY] = {}
        for routes in route_modules():
            routes.setup_routes(app, ctx)
        return app

    @staticmethod
    def _signature_of(cfg: Config) -> tuple[object, ...]:
        return (cfg.api.socket, cfg.api.socket_mode, cfg.api.tcp, cfg.api.token_file, cfg.http.enabled,
                cfg.http.port, cfg.http.idle_timeout, tuple((i.name, str(i.address)) for i in cfg.interfaces),
                cfg.ui.listen, cfg.ui.tls_cert, cfg.ui.tls_key, _mtime(cfg.ui.tls_cert), _mtime(cfg.ui.tls_key))

    @staticmethod
    def _wanted(cfg: Config) -> list[tuple[ListenerKey, str]]:
        """(key, kind) of every socket the config asks for: the API's unix socket, its TCP address,
        the boot port on each served interface's address."""
        out: list[tuple[ListenerKey, str]] = [(("unix", str(cfg.api.socket)), "unix")]
        if cfg.api.tcp:
            host, port = split_hostport(cfg.api.tcp)
            out.append((("tcp", host, port), "api"))
        if cfg.http.enabled:
            for iface in cfg.interfaces:
                out.append((("tcp", str(iface.address.ip), cfg.http.port), "boot"))
        if cfg.ui.listen:
            host, port = split_hostport(cfg.ui.listen)
            out.append((("tcp", host, port), "ui"))
        return out

    @staticmethod
    def _tls_context(cfg: Config) -> Optional[ssl.SSLContext]:
        """The dashboard's TLS (ui.tls_cert/tls_key), TLS 1.2 at least; None without a certificate. A file
        that cannot be read or does not hold a key pair stops the start (or the reload) saying which."""
        if not cfg.ui.tls_cert or not cfg.ui.tls_key:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(cfg.ui.tls_cert, cfg.ui.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise RuntimeError(f"ui.tls_cert {cfg.ui.tls_cert} / ui.tls_key {cfg.ui.tls_key}: {e}") from e
        return context

    @staticmethod
    def _bind_tcp(host: str, port: int) -> socket.socket:
        host = "0.0.0.0" if host in ("", "*") else host
        family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    def _bind_unix(path: Path, mode: int) -> tuple[socket.socket, str]:
        """A unix socket bound under a temporary name next to `path` (renamed onto it once it serves,
        so the API socket never goes missing during a reload)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if (path.exists() or path.is_symlink()) and not stat.S_ISSOCK(path.lstat().st_mode):
            raise RuntimeError(f"{path} exists and is not a socket")
        temp = str(path.with_name(f".{path.name}.{os.getpid()}.new"))
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(temp)
            os.chmod(temp, mode)
            sock.listen(128)
        except BaseException:
            sock.close()
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
        return sock, temp

    async def _serve(self, ctx: Context, reuse: dict[ListenerKey, _Listener]) -> _Server:
        """A new app serving `ctx.config`'s sockets, listening before it returns. Sockets already open
        in `reuse` (same address) are shared, not bound again: no connection is refused during a
        reload. On any failure everything new is closed and `reuse` is left untouched."""
        cfg = ctx.config
        tls = self._tls_context(cfg)
        app = self._make_app(ctx)
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=cfg.http.idle_timeout,
                               handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        server = _Server(app, runner)
        try:
            for key, kind in self._wanted(cfg):
                if key in server.listeners:
                    where = ":".join(str(part) for part in key[1:])
                    raise RuntimeError(f"{where} is asked for twice (api.tcp, ui.listen and the boot port?)")
                old = reuse.get(key)
                if old is not None:
                    listener = _Listener(key, kind, old.sock.dup())
                elif key[0] == "unix":
                    sock, temp = self._bind_unix(Path(key[1]), int(cfg.api.socket_mode, 8))
                    listener = _Listener(key, kind, sock, temp)
                else:
                    listener = _Listener(key, kind, self._bind_tcp(key[1], key[2]))
                server.listeners[key] = listener
                await web.SockSite(runner, listener.sock, ssl_context=tls if kind == "ui" else None).start()
                if key[0] == "unix":
                    server.bound.append(f"unix:{key[1]}")
                else:
                    app[SITE_KEY][("*" if key[1] in WILDCARD_HOSTS else key[1], key[2])] = kind
                    server.bound.append(f"{kind}:{key[1]}:{key[2]}")
            for listener in server.listeners.values():  # serving: now the API socket's name moves over
                if listener.temp_path:
                    os.rename(listener.temp_path, listener.key[1])
                    listener.temp_path = None
                elif listener.key[0] == "unix":
                    os.chmod(listener.key[1], int(cfg.api.socket_mode, 8))
        except BaseException:
            for listener in server.listeners.values():
                if listener.temp_path:
                    try:
                        os.unlink(listener.temp_path)
                    except OSError:
                        pass
            await runner.cleanup()  # closes the sockets its sites serve (a reused one only as a dup)
            for listener in server.listeners.values():
                listener.sock.close()
            raise
        return server

    @staticmethod
    def _read_token(cfg: Config) -> Optional[str]:
        return Path(cfg.api.token_file).read_text().strip() if cfg.api.token_file else None

    async def start(self, ctx: Context) -> None:
        self.ctx = ctx
        token = self._read_token(ctx.config)
        self.server = await self._serve(ctx, reuse={})
        ctx.api_token = token
        self._signature = self._signature_of(ctx.config)

    async def stop(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        if self._retiring:
            await asyncio.wait(list(self._retiring), timeout=2.0)
        server, self.server = self.server, None
        if server is not None:
            await server.runner.cleanup()
            for key in server.listeners:
                if key[0] == "unix":
                    self._unlink_socket(key[1])

    @staticmethod
    def _unlink_socket(path: str) -> None:
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except OSError:
            pass

    async def reload(self, ctx: Context) -> None:
        """Routes read ctx.config at request time; only a change of sockets, token or timeouts needs a new
        server. It is listening before the old one stops accepting (sockets at unchanged addresses are
        shared); the old one then finishes its requests, this reload's own API call among them."""
        self.ctx = ctx
        signature = self._signature_of(ctx.config)
        if signature == self._signature and self.server is not None:
            return
        token = self._read_token(ctx.config)
        old = self.server
        self.server = await self._serve(ctx, reuse=old.listeners if old else {})
        ctx.api_token = token
        self._signature = signature
        log.info("http: now listening on %s", ", ".join(self.server.bound))
        if old is not None:
            for key in old.listeners:
                if key[0] == "unix" and key not in self.server.listeners:
                    self._unlink_socket(key[1])
            task = asyncio.get_running_loop().create_task(self._retire(old), name="bootd-http-retire")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _retire(server: _Server) -> None:
        """Stop accepting on a replaced server, let its requests finish (RETIRE_GRACE), then close it."""
        try:
            for site in list(server.runner.sites):
                await site.stop()  # closes this server's fds; a socket shared with the new one stays open
            if server.runner.server is not None:
                server.runner.server.pre_shutdown()  # idle keep-alive connections close; busy ones finish
                await server.runner.server.shutdown(RETIRE_GRACE)
        finally:
            await server.runner.cleanup()

    def status(self) -> dict[str, object]:
        return {"listening": self.bound}
