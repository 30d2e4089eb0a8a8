"""The bootd process: one asyncio loop that starts its services in order and stops them in reverse.

SIGTERM/SIGINT stop everything within `STOP_BUDGET` seconds; SIGHUP re-reads the config file: a valid
one is applied service by service, an invalid one is refused with its errors logged and the old one
kept. systemd hears READY, STATUS, WATCHDOG and STOPPING when NOTIFY_SOCKET is set.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from bootd.bootplan import Planner, RegisteredHost, merge_hosts
from bootd.config import Config, ConfigError, load_config
from bootd.logsetup import setup_logging
from bootd.metrics import Metrics
from bootd.notify import Notifier
from bootd.seams import Booter, ClusterRole, Disks, ReloadRequest, SnapshotJobs, Snapshots, TftpFiles
from bootd.service import Service
from bootd.state import STATE_OPEN_ERRORS, StateError, StateStore, open_state, state_url
from bootd.state_postgres import redact, wait_for_database

if TYPE_CHECKING:
    from bootd.wake import WakeQueue

log = logging.getLogger("bootd")

STOP_BUDGET = 4.5  # seconds for all services to stop: under systemd's and the brief's 5 s


@dataclass
class Context:
    """What every service shares: the config in force, the state store, counters and seams."""

    config: Config
    config_path: str
    store: StateStore
    metrics: Metrics = field(default_factory=Metrics)
    started_at: float = field(default_factory=time.time)
    services: list[Service] = field(default_factory=list)
    # Seams (bootd/seams.py), each filled by the service that offers it, None while that one is not running.
    booter: Optional[Booter] = None  # pxe.booter.Booter: what a host boots (menus)
    planner: Planner = field(init=False)  # bootd.bootplan: the one boot decision per host, read by all
    disks: Optional[Disks] = None  # nbdexport DiskManager: per-host NBD exports
    snapshots: Optional[Snapshots] = None  # snapshots/store.py SnapshotStore
    snapshot_jobs: Optional[SnapshotJobs] = None  # snapshots/jobs.py JobManager: imports, flattens
    tftp: Optional[TftpFiles] = None  # bootd/tftp/server.py TftpServer: menus and client files add names
    request_reload: Optional[ReloadRequest] = None  # Daemon.request_reload: the reload API starts one
    api_token: Optional[str] = None  # the TCP API's bearer token (api.token_file), read by the HTTP service
    cluster: Optional[ClusterRole] = None  # bootd/cluster.py: server name, DHCP active or standby (issue 20)
    wake_queue: Optional[WakeQueue] = None  # bootd/wake.py: the one paced Wake-on-LAN queue, made on first use
    reload_errors: list[str] = field(default_factory=list)
    last_reload: Optional[float] = None
    file_config: Config = field(init=False)  # the config as loaded; `config` adds the registered hosts
    host_conflicts: tuple[str, ...] = ()  # registered hosts the config's won over (bootctl host list)

    def __post_init__(self) -> None:
        self.planner = Planner(self)  # reads self.config and self.snapshots at every call
        self.set_config(self.config)

    def set_config(self, config: Config) -> None:
        """Put `config` (as loaded) in force with the hosts registered in the state store beside its own."""
        self.file_config = config
        self.refresh_hosts()

    def refresh_hosts(self) -> None:
        """Re-read the registered hosts (after a bootctl host change): every reader of `config` sees them."""
        registered = [RegisteredHost(r["mac"], r["name"], r["group"], r["ip"]) for r in self.store.registered_hosts()]
        merged = merge_hosts(self.file_config, registered)
        self.config, self.host_conflicts = merged.config, merged.conflicts

    def service(self, name: str) -> Optional[Service]:
        for s in self.services:
            if s.name == name:
                return s
        return None


def build_services(ctx: Context) -> list[Service]:
    """The services in start order (stopped in reverse). One line per component."""
    from bootd.http.app import HttpService

    services: list[Service] = []
    from bootd.cluster import Cluster
    services.append(Cluster())  # issue 20: this server's heartbeat in the state, and its DHCP role (first)
    from bootd.hostregistry import HostRegistryService
    services.append(HostRegistryService())  # issue 16: registered hosts; warns when the config's win a conflict
    from bootd.hostfeed import HostFeed
    services.append(HostFeed())  # issue 18: PCs' tiles pushed live to the dashboard (idle while nobody watches)
    from bootd.metrichistory import MetricHistory
    services.append(MetricHistory())  # issue 18: the last hour of bytes served per protocol (Server page)
    # Storage first (the snapshot store and NBD exports), then what serves files, DHCP last: a PC must
    # never be told to fetch something that is not served yet.
    from snapshots.service import SnapshotService
    services.append(SnapshotService())  # snapshot helper: ctx.snapshots (fsck at start-up), before NBD/menus
    from nbdexport.service import DiskService
    services.append(DiskService())  # NBD helper: ctx.disks (qemu-storage-daemon, per-host overlays), before menus
    from bootd.tftp.service import TftpService
    services.append(TftpService())
    from pxe.service import MenuService
    services.append(MenuService())  # menus helper: ctx.booter + per-host menus over TFTP (after TFTP)
    services.append(HttpService())
    from bootd.nfs import NfsService
    services.append(NfsService())  # client helper: NFS exports of the client roots
    from bootd.clientconfig.service import ClientFilesService
    services.append(ClientFilesService())  # client helper: clients/<mac>/<file> over TFTP (HTTP: client_api)
    from bootd.dhcp.server import DhcpService
    services.append(DhcpService())  # DHCP/proxyDHCP + RA responder: last, once everything it points to is served
    from bootd.bootchecks import SetupChecks
    services.append(SetupChecks())  # warnings: missing kernel/initrd, another DHCP server (start and reload)
    return services


class Daemon:
    def __init__(self, config_path: str):
        self.config_path = config_path
        self.notifier = Notifier()
        self.ctx: Optional[Context] = None
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._reload_tasks: set[asyncio.Task[bool]] = set()  # running reloads (a task needs a reference)

    async def run(self) -> int:
        try:
            config = load_config(self.config_path)
        except ConfigError as e:
            setup_logging("info")
            for p in e.problems:
                log.error("config: %s", p)
            return 1
        setup_logging(config.log.level)
        storage = Path(config.storage.directory)
        storage.mkdir(parents=True, exist_ok=True)
        url = state_url(config.state.url)
        try:
            if url:  # a server started with (or before) its database server: wait for it, say so
                self.notifier.status("waiting for the state database")
                await asyncio.to_thread(wait_for_database, url, 60.0)
            store = open_state(storage / "state.db", url=config.state.url,
                               reserve_bytes=config.storage.state_reserve_mb << 20)
        except StateError as e:  # corrupt, unreadable, not a database: say which file and why, no traceback
            log.error("cannot open the state database: %s", e)
            return 1
        except STATE_OPEN_ERRORS as e:  # a failed migration (its message names the file), no permission
            log.error("cannot open the state database %s: %s", redact(url) if url else storage / "state.db", e)
            return 1
        ctx = self.ctx = Context(config=config, config_path=self.config_path, store=store)
        ctx.request_reload = self.request_reload
        self._prepare_boot_root(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

        ctx.services = build_services(ctx)
        started: list[Service] = []
        try:
            for svc in ctx.services:
                self.notifier.status(f"starting {svc.name}")
                await svc.start(ctx)
                started.append(svc)
                log.info("started %s", svc.name)
        except Exception as e:
            log.error("cannot start %s: %s", ctx.services[len(started)].name, e,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            await self._stop_services(started)
            store.close()
            return 1

        # Config, leases and caches made at start-up live as long as the process: move them out of the
        # collector's reach so full collections on the DHCP hot path stay short.
        gc.collect()
        gc.freeze()
        self.notifier.ready(self.status_line())
        self.notifier.start_watchdog()
        log.info("bootd ready (pid %d): %s", os.getpid(), self.status_line())
        await self._stop.wait()

        log.info("stopping")
        self.notifier.stopping()
        self.notifier.stop_watchdog()
        for task in list(self._reload_tasks):  # a reload half done when asked to stop: stop it first
            task.cancel()
        if self._reload_tasks:
            await asyncio.wait(list(self._reload_tasks), timeout=1.0)
        await self._stop_services(started)
        store.close()
        log.info("stopped")
        return 0

    @staticmethod
    def _prepare_boot_root(config: Config) -> None:
        from pxe.loaders import install_loaders
        try:
            install_loaders(config.boot_root, config.dhcp.loaders)
        except OSError as e:
            log.warning("cannot install stock loaders into %s: %s", config.boot_root, e)

    def status_line(self) -> str:
        ctx = self.ctx
        if ctx is None:
            return "starting"
        ifaces = ",".join(i.name for i in ctx.config.interfaces) or "none"
        line = f"serving on {ifaces}; services: {', '.join(s.name for s in ctx.services)}"
        warnings = [w for w in (s.warning() for s in ctx.services) if w]
        return "; ".join(["WARNING " + w for w in warnings] + [line])

    async def _stop_services(self, started: list[Service]) -> None:
        deadline = time.monotonic() + STOP_BUDGET
        for svc in reversed(started):
            remaining = max(0.1, deadline - time.monotonic())
            try:
                await asyncio.wait_for(svc.stop(), timeout=remaining)
                log.info("stopped %s", svc.name)
            except asyncio.TimeoutError:
                log.error("%s did not stop in time; abandoning it", svc.name)
            except Exception as e:
                log.error("error stopping %s: %s", svc.name, e)

    def request_reload(self) -> "asyncio.Task[bool]":
        """Start a reload in a task of its own and return it. A reload restarts services (the HTTP one
        among them), so it must not run inside a request or signal handler those services could cancel;
        an API request awaits the task shielded. Reloads run one after another (`_reload_lock`)."""
        task = asyncio.get_running_loop().create_task(self.reload(), name="bootd-reload")
        self._reload_tasks.add(task)
        task.add_done_callback(self._reload_tasks.discard)
        return task

    async def reload(self) -> bool:
        """Re-read the config; apply it if valid, else keep the old one. Returns whether it applied.

        Every reload ends with READY=1 (systemd waits for it after RELOADING=1), whatever happened.
        """
        ctx = self.ctx
        if ctx is None:
            return False
        async with self._reload_lock:
            self.notifier.reloading()
            ready_status = "reload did not finish"
            try:
                try:
                    # off the loop: a big file takes seconds to parse, and DHCP/TFTP/HTTP keep serving
                    new = await asyncio.to_thread(load_config, self.config_path)
                except ConfigError as e:
                    ctx.reload_errors = [str(p) for p in e.problems]
                    for p in e.problems:
                        log.error("reload refused, keeping the running config: %s", p)
                    ready_status = f"config reload refused ({len(e.problems)} problems)"
                    return False
                except Exception as e:  # a loader bug must not leave systemd waiting or the loop dead
                    log.exception("reload refused, keeping the running config: cannot load %s", self.config_path)
                    ctx.reload_errors = [f"{self.config_path}: cannot load: {type(e).__name__}: {e}"]
                    ready_status = "config reload refused (loader error)"
                    return False
                ctx.set_config(new)
                self._prepare_boot_root(new)
                ctx.reload_errors = []
                ctx.last_reload = time.time()
                reloaded = []
                for svc in ctx.services:
                    try:
                        await svc.reload(ctx)
                        reloaded.append(svc.name)
                    except asyncio.CancelledError:
                        log.error("reload cancelled while %s applied the new config; services not "
                                  "reloaded: %s", svc.name,
                                  ", ".join(s.name for s in ctx.services if s.name not in reloaded) or "none")
                        raise
                    except Exception as e:
                        log.error("%s could not apply the new config: %s", svc.name, e)
                        ctx.reload_errors.append(f"{svc.name}: {e}")
                log.info("configuration reloaded from %s; services reloaded: %s%s", self.config_path,
                         ", ".join(reloaded) or "none",
                         f"; {len(ctx.reload_errors)} failed" if ctx.reload_errors else "")
                ready_status = "configuration reloaded"
                return True
            finally:
                self.notifier.ready(f"{ready_status}; {self.status_line()}")


def run_daemon(config_path: str) -> int:
    return asyncio.run(Daemon(config_path).run())
