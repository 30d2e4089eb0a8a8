"""From a running bootd to a host's rendered files: which host, which merged clients settings, which
disk export per instance.

The disk of an instance comes, in this order, from its fixed `disk_uri`, from the NBD manager
(`ctx.disks.export_for`: the export of the snapshot the host's boot plan gives the instance's image,
else the boot's main disk), or from the host's boot menu
(the `bootd.nbd=HOST:PORT/EXPORT` word its entry's kernel command line carries).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from bootd.bootplan import BootPlan
from bootd.config import normalize_mac

from .model import ClientsConfig, InstanceConfig, merge_clients
from .render import DiskRef, HostRef, RenderError, index_entries, render_host


class UnknownHost(LookupError):
    pass


class NoClientConfig(LookupError):
    pass


@dataclass
class RenderedHost:
    host: HostRef
    clients: ClientsConfig
    disks: list[DiskRef]
    files: dict[str, str] = field(default_factory=dict)

    def index(self) -> dict:
        return {"mac": self.host.mac, "name": self.host.name, "init": self.clients.init,
                "files": list(self.files), "instances": index_entries(self.host, self.clients, self.disks)}


def find_host(config, key: str, store=None) -> tuple[HostRef, object]:
    """A host by MAC or config name -> (HostRef, HostConfig|None). MACs not in the config are known
    only when the state store has seen them (they get no group, so no clients settings)."""
    try:
        mac = normalize_mac(key)
    except ValueError:
        mac = None
    if mac:
        hc = config.host_by_mac(mac)
        if hc is not None:
            return HostRef(hc.mac, hc.name), hc
        if store is not None:
            row = store.host(mac)
            if row is not None:
                return HostRef(mac, row.get("name")), None
        raise UnknownHost(f"unknown host {key}")
    hc = config.host_by_name(key)
    if hc is None:
        raise UnknownHost(f"unknown host {key!r} (give a MAC or a configured host name)")
    return HostRef(hc.mac, hc.name), hc


def clients_for(config, hc) -> ClientsConfig | None:
    """Group settings with the host's overrides on top."""
    if hc is None:
        return None
    group = config.group(hc.group) if hc.group else None
    return merge_clients(group.clients if group else None, hc.clients)


def _get(obj, *names):
    for n in names:
        if isinstance(obj, dict) and obj.get(n) is not None:
            return obj[n]
        if not isinstance(obj, dict) and getattr(obj, n, None) is not None:
            return getattr(obj, n)
    return None


def disk_from_export(export, config, source: str) -> DiskRef:
    """A DiskRef from whatever the NBD manager returns (attrs or dict; uri or host/port/name)."""
    uri = _get(export, "uri", "nbd_uri")
    fmt = _get(export, "format", "fmt") or "raw"
    if isinstance(uri, str) and uri.startswith("nbd"):
        return DiskRef(uri, fmt, source)
    name = _get(export, "name", "export", "export_name", "token")
    if not name:
        raise RenderError(f"NBD export {export!r} has no name")
    host = _get(export, "host", "address") or config.server_ip
    port = _get(export, "port") or config.nbd.port
    if host is None:
        raise RenderError("no server address for the NBD export (no interfaces configured)")
    return DiskRef(f"nbd://{host}:{int(port)}/{name}", fmt, source)


def snapshot_for_instance(plan: BootPlan, inst: InstanceConfig) -> int | None:
    """The snapshot under an instance's disk, from the host's boot plan (bootd/bootplan.py): its image's
    menu entry, or the plan's main disk when it names no image (or an image the host does not boot)."""
    sid = plan.snapshot_for_image(inst.image) if inst.image is not None else None
    return sid if sid is not None else plan.disk.snapshot_id


async def disk_for(ctx, mac: str, inst: InstanceConfig) -> DiskRef:
    config = ctx.config
    if inst.disk_uri:
        return DiskRef(inst.disk_uri, inst.format or "raw", "config")
    disks = getattr(ctx, "disks", None)
    if disks is not None:
        plan = ctx.planner.plan_for(mac)
        sid = snapshot_for_instance(plan, inst)
        # the plan's main disk is the boot's main export (a persistent layer may sit on an older snapshot)
        main = sid is None or sid == plan.disk.snapshot_id
        export = disks.export_for(mac) if main else disks.export_for(mac, sid)
        if inspect.isawaitable(export):
            export = await export
        if export is None and not main and hasattr(disks, "prepare_export"):
            export = await disks.prepare_export(mac, sid, server_ip=config.server_ip)
        if export is None:
            raise RenderError(f"{mac} has no disk export yet (it gets one when it boots from the menu)")
        return disk_from_export(export, config, "disks")
    # No NBD manager: the same per-host token the boot menu puts on the kernel command line.
    store = getattr(ctx, "store", None)
    if store is not None and config.nbd.enabled and config.server_ip:
        try:
            from pxe.tokens import fallback_token
        except ImportError:
            fallback_token = None
        if fallback_token is not None:
            token = fallback_token(store, mac)
            return DiskRef(f"nbd://{config.server_ip}:{config.nbd.port}/{token}", "raw", "menu")
    raise RenderError(f"no disk export for instance {inst.name or '?'} (image {inst.image or 'default'}) of "
                      f"{mac}: set disk_uri or let the NBD manager export the host's disk")


async def render_for(ctx, key: str) -> RenderedHost:
    """Everything a host's client fetches; raises UnknownHost, NoClientConfig or RenderError."""
    config = ctx.config
    host, hc = find_host(config, key, getattr(ctx, "store", None))
    clients = clients_for(config, hc)
    if clients is None or not clients.instances:
        raise NoClientConfig(f"host {host.label} has no clients settings (set clients: in its group or host)")
    disks = [await disk_for(ctx, host.mac, inst) for inst in clients.instances]
    return RenderedHost(host, clients, disks, render_host(host, clients, disks))
