"""From a running bootd to a host's rendered files: which host, which merged clients settings, which
disk export per instance.

The disk of an instance comes, in this order, from its fixed `disk_uri`, from the NBD manager
(`ctx.disks.export_for`: the export of the snapshot the host's boot plan gives the instance's image,
else the boot's main disk), or from the host's boot menu
(the `bootd.nbd=HOST:PORT/EXPORT` word its entry's kernel command line carries).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from bootd.bootplan import BootPlan
from bootd.config import Config, HostConfig
from bootd.macaddr import normalize_mac
from bootd.seams import DiskExport
from bootd.state import StateStore
from pxe.tokens import fallback_token

from .model import ClientsConfig, InstanceConfig, merge_clients
from .render import DiskRef, HostRef, RenderError, index_entries, render_host

if TYPE_CHECKING:
    from bootd.daemon import Context


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

    def index(self) -> dict[str, Any]:
        return {"mac": self.host.mac, "name": self.host.name, "init": self.clients.init,
                "files": list(self.files), "instances": index_entries(self.host, self.clients, self.disks)}


def find_host(config: Config, key: str, store: Optional[StateStore] = None) -> tuple[HostRef, Optional[HostConfig]]:
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


def clients_for(config: Config, hc: Optional[HostConfig]) -> ClientsConfig | None:
    """Group settings with the host's overrides on top."""
    if hc is None:
        return None
    group = config.group(hc.group) if hc.group else None
    return merge_clients(group.clients if group else None, hc.clients)


def disk_from_export(export: DiskExport, source: str) -> DiskRef:
    """The DiskRef of an NBD export the disks seam made (its URI is vetted again by DiskRef)."""
    return DiskRef(export.uri, export.format, source)


def snapshot_for_instance(plan: BootPlan, inst: InstanceConfig) -> int | None:
    """The snapshot under an instance's disk, from the host's boot plan (bootd/bootplan.py): its image's
    menu entry, or the plan's main disk when it names no image (or an image the host does not boot)."""
    sid = plan.snapshot_for_image(inst.image) if inst.image is not None else None
    return sid if sid is not None else plan.disk.snapshot_id


async def disk_for(ctx: Context, mac: str, inst: InstanceConfig) -> DiskRef:
    config = ctx.config
    if inst.disk_uri:
        return DiskRef(inst.disk_uri, inst.format or "raw", "config")
    disks = ctx.disks
    if disks is not None:
        plan = ctx.planner.plan_for(mac)
        sid = snapshot_for_instance(plan, inst)
        # the plan's main disk is the boot's main export (a persistent layer may sit on an older snapshot)
        main = sid is None or sid == plan.disk.snapshot_id
        export = disks.export_for(mac) if main else disks.export_for(mac, sid)
        if export is None and sid is not None and not main:
            export = await disks.prepare_export(mac, sid, server_ip=config.server_ip)
        if export is None:
            raise RenderError(f"{mac} has no disk export yet (it gets one when it boots from the menu)")
        return disk_from_export(export, "disks")
    # No NBD manager: the same per-host token the boot menu puts on the kernel command line.
    if config.nbd.enabled and config.server_ip:
        token = fallback_token(ctx.store, mac)
        return DiskRef(f"nbd://{config.server_ip}:{config.nbd.port}/{token}", "raw", "menu")
    raise RenderError(f"no disk export for instance {inst.name or '?'} (image {inst.image or 'default'}) of "
                      f"{mac}: set disk_uri or let the NBD manager export the host's disk")


async def render_for(ctx: Context, key: str) -> RenderedHost:
    """Everything a host's client fetches; raises UnknownHost, NoClientConfig or RenderError."""
    config = ctx.config
    host, hc = find_host(config, key, ctx.store)
    clients = clients_for(config, hc)
    if clients is None or not clients.instances:
        raise NoClientConfig(f"host {host.label} has no clients settings (set clients: in its group or host)")
    disks = [await disk_for(ctx, host.mac, inst) for inst in clients.instances]
    return RenderedHost(host, clients, disks, render_host(host, clients, disks))
