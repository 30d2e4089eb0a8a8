"""TftpService: the daemon's handle on the TFTP server (config -> TftpServer, start/stop/reload).

`ctx.service("tftp").server` and `ctx.tftp` are the running TftpServer, so other
components (the menus) can call `add_provider(...)` on it; see bootd/tftp/server.py.
A reload keeps transfers running: only the listeners are rebound when addresses or port change,
and new limits apply to new transfers. `tftp.data_pump` and `tftp.run_dir` apply at the next start.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from bootd import peers
from bootd.config import Config, TftpConfig
from bootd.hoststate import host_name
from bootd.service import Service
from bootd.tftp.limits import ServerLimits
from bootd.tftp.server import Address, TftpServer
from bootd.tftp.session import SessionLimits

if TYPE_CHECKING:
    from bootd.daemon import Context

log = logging.getLogger("bootd.tftp")


def limits_from_config(tftp: TftpConfig) -> tuple[SessionLimits, ServerLimits]:
    session = SessionLimits(
        max_blksize=tftp.max_blksize,
        max_windowsize=tftp.max_windowsize,
        timeout=float(tftp.timeout),
        max_timeout=max(float(tftp.timeout), 8.0),
        retries=tftp.retries,
        session_timeout=float(tftp.session_timeout),
    )
    server = ServerLimits(
        max_sessions=tftp.max_sessions,
        max_sessions_per_client=tftp.max_sessions_per_client,
        max_open_files=tftp.max_open_files,
        leading_slash=tftp.leading_slash,
    )
    return session, server


def listen_addresses(config: Config) -> list[Address]:
    """Where TFTP listens: `tftp.addresses` if set, else every served interface's address (none when
    the config lists no interface: bootd serves nothing on a network it was not told about)."""
    addrs = [str(a) for a in config.tftp.addresses]
    if not addrs:
        addrs = [str(i.address.ip) for i in config.interfaces]
    return [(a, config.tftp.port) for a in dict.fromkeys(addrs)]


def pump_run_dir(cfg: Config) -> Path:
    """Where the C data pump is built: `tftp.run_dir`, default <storage.directory>/run."""
    return Path(cfg.tftp.run_dir) if cfg.tftp.run_dir else cfg.storage_dir / "run"


class TftpService(Service):
    name = "tftp"

    def __init__(self) -> None:
        self.server: TftpServer | None = None
        self._addresses: list[tuple[str, int]] = []

    async def start(self, ctx: Context) -> None:
        cfg = ctx.config
        if not cfg.tftp.enabled:
            log.info("tftp: disabled in the config")
            return
        root = cfg.boot_root
        Path(root).mkdir(parents=True, exist_ok=True)
        session_limits, server_limits = limits_from_config(cfg.tftp)
        if self.server is None:
            self.server = TftpServer(str(root), limits=session_limits, server_limits=server_limits,
                                     store=ctx.store, metrics=ctx.metrics, data_pump=cfg.tftp.data_pump,
                                     run_dir=pump_run_dir(cfg), mac_resolver=lambda ip: peers.mac_at(ctx, ip),
                                     host_namer=lambda mac: host_name(ctx, mac))
        ctx.tftp = self.server
        ctx.metrics.add_gauges("tftp", self.server.gauges)
        self._addresses = listen_addresses(cfg)
        if not self._addresses:
            log.warning("tftp: no interfaces or tftp.addresses in the config: not listening")
        await self.server.start(self._addresses)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()

    async def reload(self, ctx: Context) -> None:
        cfg = ctx.config
        if self.server is None or not cfg.tftp.enabled:
            await self.stop()
            if cfg.tftp.enabled:
                await self.start(ctx)
            return
        self.server.limits, self.server.server_limits = limits_from_config(cfg.tftp)
        self.server.root = str(cfg.boot_root)
        Path(self.server.root).mkdir(parents=True, exist_ok=True)
        addresses = listen_addresses(cfg)
        if addresses != self._addresses:
            await self.server.close_listeners()
            self._addresses = addresses
            await self.server.start(addresses)

    def status(self) -> dict[str, object]:
        return self.server.status() if self.server is not None else {"enabled": False}
