"""Boot files and iPXE scripts over HTTP, on the same aiohttp server as the API.

- `GET|HEAD /boot/files/<path>`: a file under the HTTP boot root (default: the TFTP root), sent with
  sendfile; Range, HEAD, ETag/If-Modified-Since come from aiohttp's FileResponse. Names leaving the
  root (`..`, absolute, backslash, NUL, symlinks pointing out) are 404, never the file.
- `GET /boot/<mac>.ipxe`: the host's iPXE menu, rendered now (a new boot: fresh disk overlays).
- `GET /boot/boot.ipxe`: a two-line script chaining to the per-MAC one, for hand-made DHCP setups.
- `GET /grub/grub.cfg[-01-<mac>]`: the host's GRUB menu for a GRUB that came over UEFI HTTP boot (its
  prefix is /grub on the server it came from); its kernel and initrd paths point into /boot/files.
  GRUB's other probes under /grub/ (module lists, fonts) are a quiet 404.
Every fetch is a boot event (loader/menu/script/kernel/initrd/file) so `bootctl hosts NAME` shows the
boot's timeline. Connections per client address are capped (http.max_connections_per_ip): a PC
looping in its firmware cannot starve the other 299 at 8:00; idle keep-alive connections close after
http.idle_timeout (the runner's keepalive_timeout).
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.typedefs import Handler, LooseHeaders

from bootd.bootnames import event_kind, is_optional
from bootd.hoststate import host_name, record_failure
from bootd.macaddr import parse_mac
from bootd.peers import mac_at, may_act_for, refuse
from bootd.tftp.paths import resolve
from pxe.booter import Booter, render
from pxe.grub import render_grub
from pxe.menu import BootMenu
from pxe.service import GRUB_RE

if TYPE_CHECKING:
    from bootd.daemon import Context

log = logging.getLogger("bootd.http.boot")

CAP_KEY: web.AppKey[ConnectionCap] = web.AppKey("bootd_connection_cap")


# -- confinement -------------------------------------------------------------------------------------
def confined_path(root: Path, rel: str) -> Optional[Path]:
    """`root/rel` if it names a regular file inside root (symlinks resolved), else None. The TFTP
    server's confinement (bootd/tftp/paths.py), so both protocols serve exactly the same names; a
    leading '/' is refused here (a URL path never has one after the route's prefix)."""
    real = resolve(str(root), rel, leading_slash="refuse")
    return Path(real) if real is not None else None


# -- per-client connection cap ------------------------------------------------------------------------
class ConnectionCap:
    """Open connections per client address, counted from their first request until they close."""

    def __init__(self) -> None:
        self.by_ip: dict[str, set[asyncio.BaseTransport]] = {}
        self._admits = 0

    def admit(self, ip: str, transport: asyncio.BaseTransport, cap: int) -> bool:
        conns = self.by_ip.setdefault(ip, set())
        if transport in conns:
            return True
        self._prune(conns)
        if len(conns) >= cap:
            return False
        conns.add(transport)
        self._admits += 1
        if self._admits % 1024 == 0:
            for key in list(self.by_ip):
                self._prune(self.by_ip[key])
                if not self.by_ip[key]:
                    del self.by_ip[key]
        return True

    @staticmethod
    def _prune(conns: set[asyncio.BaseTransport]) -> None:
        for t in [t for t in conns if t.is_closing()]:
            conns.discard(t)

    def open_connections(self) -> int:
        return sum(sum(1 for t in c if not t.is_closing()) for c in self.by_ip.values())


@web.middleware
async def connection_cap_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    ip = request.remote
    transport = request.transport
    if ip and transport is not None and request.get("site") != "unix" and not isinstance(
            transport.get_extra_info("sockname"), (str, bytes)):
        ctx = request.app["ctx"]
        cap: ConnectionCap = request.app[CAP_KEY]
        if not cap.admit(ip, transport, ctx.config.http.max_connections_per_ip):
            ctx.metrics.inc("http", "refused", reason="per-ip-cap")
            log.warning("http: %s has %d connections open, refusing another", ip,
                        ctx.config.http.max_connections_per_ip)
            resp = web.Response(status=503, text="too many connections from your address\n",
                                headers={"Retry-After": "1", "Connection": "close"})
            resp.force_close()
            return resp
    return await handler(request)


# -- helpers ------------------------------------------------------------------------------------------
def local_ip(request: web.Request) -> Optional[str]:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and sockname:
        address: str = sockname[0]
        return address
    return None


def file_kind(ctx: Context, rel: str) -> str:
    for image in ctx.config.images:
        if rel == image.kernel.lstrip("/"):
            return "kernel"
        if rel == image.initrd.lstrip("/"):
            return "initrd"
    return event_kind(rel)


class BootFileResponse(web.FileResponse):
    """A FileResponse that records the fetch (bytes sent, time taken) once it is done."""

    def __init__(self, path: Path, ctx: Context, rel: str, status: int = 200, reason: Optional[str] = None,
                 headers: Optional[LooseHeaders] = None):
        super().__init__(path, chunk_size=256 * 1024, status=status, reason=reason, headers=headers)
        self._ctx = ctx
        self._rel = rel

    async def prepare(self, request: web.BaseRequest) -> Optional[AbstractStreamWriter]:
        t0 = time.monotonic()
        error = None
        try:
            return await super().prepare(request)
        except (ConnectionError, OSError) as e:
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self._record(request, time.monotonic() - t0, error)

    def _record(self, request: web.BaseRequest, duration: float, error: Optional[str]) -> None:
        ctx = self._ctx
        ctx.metrics.inc("http", "responses", status=str(self.status))
        if request.method != "GET" or self.status not in (200, 206):
            return
        nbytes = self.content_length or 0
        ctx.metrics.inc("http", "bytes", nbytes)
        mac = mac_at(ctx, request.remote)
        detail: dict[str, object] = {"path": self._rel, "proto": "http", "status": self.status,
                                     "client": request.remote}
        if request.headers.get("Range"):
            detail["range"] = request.headers.get("Range")
        if error:
            detail["error"] = error
            step = file_kind(ctx, self._rel)
            record_failure(ctx.store, mac, step, f"{step} {self._rel}: transfer broken over HTTP ({error})",
                           host=host_name(ctx, mac), path=self._rel, proto="http", client=request.remote)
        try:
            ctx.store.record_event(mac, file_kind(ctx, self._rel), detail, nbytes=nbytes,
                                   duration=round(duration, 6))
            if mac:
                ctx.store.touch_host(mac, ip=request.remote)
        except Exception as e:  # the timeline must never break a transfer
            log.warning("http: cannot record boot event: %s", e)


def _not_found(ctx: Context, request: web.Request, rel: str) -> None:
    """A PC asked for a boot file that is not there: a failed boot step on its timeline and a warning
    naming it. An address no host is known at only gets an info line (scanners, browsers)."""
    if is_optional(rel):
        log.debug("http: %s asked for optional %r: not there", request.remote, rel)
        return
    mac = mac_at(ctx, request.remote)
    step = file_kind(ctx, rel)
    reason = f"{step} {rel}: not found over HTTP"
    if mac is None:
        log.info("http: %s asked for %r: not found", request.remote, rel)
        return
    record_failure(ctx.store, mac, step, reason, host=host_name(ctx, mac), path=rel, proto="http",
                   client=request.remote)
    try:
        ctx.store.touch_host(mac, ip=request.remote)
    except Exception as e:  # the 404 goes out either way
        log.warning("http: cannot record host %s: %s", mac, e)


# -- handlers -----------------------------------------------------------------------------------------
async def boot_file(request: web.Request) -> web.StreamResponse:
    ctx = request.app["ctx"]
    rel = re.sub("/{2,}", "/", request.match_info["path"])  # shim asks for DIR//grubx64.efi
    path = confined_path(ctx.config.http_root, rel)
    if path is None:
        ctx.metrics.inc("http", "not_found")
        _not_found(ctx, request, rel)
        raise web.HTTPNotFound(text="not found\n")
    return BootFileResponse(path, ctx, rel)


async def _menu_response(request: web.Request, mac: str, what: str, kind: str, path: str,
                         render_menu: Callable[[BootMenu], str]) -> web.Response:
    """The host's menu, rendered now (a new boot: fresh disk overlays), for its own address only; one
    boot event of `kind` for it."""
    ctx = request.app["ctx"]
    if not may_act_for(ctx, request.remote, mac, request.get("site", "boot")):
        refuse(ctx, "http", request.remote, mac, f"the {what}")
        raise web.HTTPForbidden(text="this menu belongs to another host\n")
    t0 = time.monotonic()
    booter = ctx.booter or Booter(ctx)
    menu = await booter.menu_for(mac, local_ip(request))
    body = render_menu(menu).encode()
    if request.remote:
        ctx.store.touch_host(mac, ip=request.remote)
    ctx.store.record_event(mac, kind, {"path": path, "proto": "http", "default": menu.default,
                                      "client": request.remote},
                           nbytes=len(body), duration=round(time.monotonic() - t0, 6))
    log.info("http: %s for %s (default %s)", what, mac, menu.default, extra={"mac": mac})
    return web.Response(body=body, content_type="text/plain", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


async def ipxe_script(request: web.Request) -> web.Response:
    mac = parse_mac(request.match_info["mac"])
    if mac is None:
        raise web.HTTPNotFound(text="not a MAC address\n")
    return await _menu_response(request, mac, "iPXE menu", "script", request.path, lambda m: render(m, "ipxe"))


async def grub_menu(request: web.Request) -> web.Response:
    """GRUB after a UEFI HTTP boot: its root is this server, so kernel and initrd are under /boot/files."""
    ctx = request.app["ctx"]
    name = "grub/" + request.match_info["name"]
    m = GRUB_RE.fullmatch(name)
    if m is None:
        log.debug("http: %s asked for %r: not served (a GRUB probe)", request.remote, name)
        raise web.HTTPNotFound(text="not found\n")
    mac = parse_mac(m.group("mac")) if m.group("mac") else mac_at(ctx, request.remote)
    if mac is None:
        raise web.HTTPNotFound(text="no host is known at your address\n")
    return await _menu_response(request, mac, "GRUB menu", "menu", name,
                                lambda menu: render_grub(menu, files="/boot/files"))


async def chain_script(request: web.Request) -> web.Response:
    # ${net0/mac} is aa:bb:cc:dd:ee:ff, which the per-MAC route accepts as it is.
    return web.Response(text="#!ipxe\nchain /boot/${net0/mac}.ipxe\n", content_type="text/plain",
                        headers={"Cache-Control": "no-store"})


def setup_routes(app: web.Application, ctx: Context) -> None:
    app[CAP_KEY] = ConnectionCap()
    app.middlewares.append(connection_cap_middleware)
    app.router.add_get("/boot/boot.ipxe", chain_script, allow_head=False)
    app.router.add_get("/boot/files/{path:.+}", boot_file)  # HEAD too
    app.router.add_get("/boot/{mac}.ipxe", ipxe_script, allow_head=False)
    app.router.add_get("/grub/{name:.+}", grub_menu, allow_head=False)
    cap = app[CAP_KEY]
    ctx.metrics.add_gauges("http", lambda: {"open_connections": cap.open_connections()})
