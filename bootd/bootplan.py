"""One boot decision per host: what a PC boots, decided once and read by everyone who serves it.

`plan_for(config, snapshots, mac) -> BootPlan` gives a host's effective settings (host over group over
defaults: group, images, default image, menu flavour, persistent disk), its menu entries with the
snapshot each boots (and the "previous" entries), the default entry, and the disk its boot gets (an
overlay over the default entry's snapshot, plus one export per other snapshot the menu offers).

The DHCP loader choice, the menus (pxe/booter.py), the NBD manager's resolver (nbdexport/service.py),
the snapshot store's resolvers (snapshots/store.py) and the client configs (bootd/clientconfig/resolve.py)
all read it, so a menu default and the disk under it can no longer come from two rules that disagree.
The plan is pure given its inputs: the config and what `SnapshotState` reports of the snapshot store.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence, TypeVar

from bootd.config import Config, GroupConfig, HostConfig, ImageConfig
from bootd.macaddr import normalize_mac, parse_mac
from snapshots.model import ALL_GROUPS

LOCAL_KEY = "local"  # the menu's "boot from local disk" entry; no image entry may take this key
ADMIN_KEY = "bootd-admin"  # the iPXE menu's "Admin" entry (issue 17); reserved the same way
_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

# What a host boots of one image, strongest first: (assignment kind, whose, the reason shown to admins).
_PRECEDENCE = (("maintenance", "host", "maintenance"), ("pin", "host", "pinned"), ("test", "host", "test"),
               ("current", "group", "group"), ("current", "all", "all groups"))


# -- inputs ------------------------------------------------------------------------------------------
class PlannedSnapshot(Protocol):
    """What the plan keeps of a snapshot (snapshots.model.Snapshot has it)."""

    @property
    def id(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> Optional[int]: ...


SnapshotT = TypeVar("SnapshotT", bound=PlannedSnapshot, covariant=True)


class SnapshotState(Protocol[SnapshotT]):
    """What the planner reads of the snapshot store (snapshots/store.py SnapshotStore)."""

    def assigned(self, image: str, kind: str, target: str) -> Optional[SnapshotT]:
        """The snapshot of the active `kind` assignment ('current', 'pin', 'test', 'maintenance') of
        `image` to `target` (a group name, '*' for all groups, or a MAC); None if none or no such image."""
        ...

    def previous_for(self, group: Optional[str], image: str) -> Optional[SnapshotT]:
        """The snapshot a rollback of (image, group) would make current."""
        ...

    def boot_dir_for(self, snapshot_id: int) -> Optional[str]:
        """Where a native image's snapshot keeps its own kernel and initramfs (relative to the boot root);
        a draft boots its nearest ancestor's. None when it carries none."""
        ...


class SnapshotJobRecord(Protocol):
    """A background snapshot job as the planner reads it (snapshots.jobs.Job): kind, target, state."""

    def to_dict(self) -> dict[str, Any]: ...


class SnapshotJobList(Protocol):
    """The snapshot jobs (snapshots/jobs.py JobManager, `ctx.snapshot_jobs`): running imports."""

    def list(self) -> Sequence[SnapshotJobRecord]: ...


class PlanSources(Protocol):
    """Where a Planner reads its inputs at every call (bootd.daemon.Context): a reload or a promote shows
    in the next plan."""

    @property
    def config(self) -> Config: ...

    @property
    def snapshots(self) -> Optional[SnapshotState[PlannedSnapshot]]: ...

    @property
    def snapshot_jobs(self) -> Optional[SnapshotJobList]: ...


def importing_images(jobs: Optional[SnapshotJobList]) -> frozenset[str]:
    """Images with an import still running (a config-listed `disk:` is imported in the background)."""
    if jobs is None:
        return frozenset()
    running = (j.to_dict() for j in jobs.list())
    return frozenset(str(d["target"]) for d in running if d.get("kind") == "import" and d.get("state") == "running")


# -- the plan ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostSettings:
    """A PC's effective settings: its identity and host-over-group-over-defaults choices."""

    mac: str
    name: Optional[str]
    group: Optional[str]
    images: tuple[str, ...]
    default_image: Optional[str]
    boot: str  # menu flavour and so the loader DHCP hands out: "ipxe" | "pxelinux" | "grub"
    persistent: bool
    cmdline: str = ""  # the group's kernel arguments, then the host's (after menu.cmdline and the image's)
    student_entries: tuple[str, ...] = ("current",)  # what the student menu shows (menu.student_entries)
    secureboot: bool = False  # UEFI Secure Boot on: shim -> signed GRUB -> signed kernel (boot is "grub")


@dataclass(frozen=True)
class MenuEntry:
    """One bootable choice. `cmdline` holds the image's own arguments; bootd's are added by the Booter."""

    key: str
    image: str
    title: str
    kernel: str  # relative to the boot root
    initrd: str  # relative to the boot root
    cmdline: str = ""
    snapshot_id: Optional[int] = None
    version: Optional[str] = None
    default: bool = False
    previous: bool = False
    importing: bool = False  # nothing promoted yet and an import of the image is running: no disk yet
    native: bool = False  # the snapshot's own kernel, its root mounted from the disk (root=/dev/nbd0)

    def __post_init__(self) -> None:
        if not _KEY_RE.match(self.key):
            raise ValueError(f"catalog entry key {self.key!r}: use lower-case letters, digits, '_' and '-'")


@dataclass(frozen=True)
class DiskPlan:
    """The disks of one boot: the main one, an overlay over `snapshot_id` (the default entry's snapshot;
    None: nothing to boot a disk from), and one more export for each snapshot in `extra`."""

    image: Optional[str]
    snapshot_id: Optional[int]
    persistent: bool
    extra: tuple[int, ...] = ()


@dataclass(frozen=True)
class BootPlan:
    """Everything about what one host boots. `default` is an entry key, None for the local disk.
    `entries` are what the menu shows (students' view: the host's `student_entries`); `hidden` the
    entries it withholds from students, which only the admin menu offers. The disks follow `entries`."""

    settings: HostSettings
    entries: tuple[MenuEntry, ...]
    default: Optional[str]
    disk: DiskPlan
    notes: tuple[str, ...] = ()
    hidden: tuple[MenuEntry, ...] = ()

    def entry(self, key: str) -> Optional[MenuEntry]:
        return next((e for e in self.entries if e.key == key), None)

    def snapshot_for_image(self, image: str) -> Optional[int]:
        """The snapshot the host boots of `image` (its non-previous entry, shown or hidden: a client
        config's instance of an image boots it whatever the menu shows), None if it has none."""
        return next((e.snapshot_id for e in self.entries + self.hidden if e.image == image and not e.previous),
                    None)


# -- the host list: the config's hosts and the ones registered at run time -----------------------------
@dataclass(frozen=True)
class RegisteredHost:
    """A PC registered at run time (bootctl host add/import/adopt; state table `registered_hosts`)."""

    mac: str
    name: str
    group: Optional[str] = None
    ip: Optional[str] = None


@dataclass(frozen=True)
class HostList:
    """The effective config (its `hosts`: the file's, then the registered ones that do not clash with
    them) and one line per registered host left out or changed, for `bootctl host list` and the status."""

    config: Config
    conflicts: tuple[str, ...] = ()


def merge_hosts(config: Config, registered: Sequence[RegisteredHost]) -> HostList:
    """The one host list every consumer reads (DHCP, menus, peers, NBD, client configs): the config's
    hosts win, a registered host with the MAC, name or address of a config host is left out and reported;
    one whose group the config no longer has keeps its address but no group."""
    if not registered:
        return HostList(config)
    by_mac = {h.mac: h for h in config.hosts}
    by_name = {h.name: h for h in config.hosts}
    by_ip = {str(h.ip): h for h in config.hosts if h.ip is not None}
    groups = {g.name for g in config.groups}
    extra: list[HostConfig] = []
    conflicts: list[str] = []
    for r in registered:
        clash = by_mac.get(r.mac) or by_name.get(r.name) or (by_ip.get(r.ip) if r.ip else None)
        if clash is not None:
            what = "MAC" if clash.mac == r.mac else "name" if clash.name == r.name else f"address {r.ip}"
            conflicts.append(f"registered host {r.name} ({r.mac}) has the {what} of config host {clash.name} "
                             f"({clash.mac}): the config's wins")
            continue
        group = r.group
        if group is not None and group not in groups:
            conflicts.append(f"registered host {r.name} ({r.mac}): group {group!r} is no longer in the config")
            group = None
        try:
            extra.append(HostConfig(mac=r.mac, name=r.name, group=group,
                                    ip=ipaddress.IPv4Address(r.ip) if r.ip else None))
        except ValueError as e:  # a row the config's rules no longer take (pydantic's ValidationError)
            conflicts.append(f"registered host {r.name} ({r.mac}) left out: {e}")
    return HostList(config.model_copy(update={"hosts": [*config.hosts, *extra]}), tuple(conflicts))


# -- deciding ------------------------------------------------------------------------------------------
def entry_key(*parts: object) -> str:
    """A menu key from free text: 'Debian', 'v3' -> 'debian-v3' (safe in iPXE, pxelinux and GRUB)."""
    raw = "-".join(str(p) for p in parts if p is not None and str(p) != "")
    key = re.sub(r"[^a-z0-9_-]+", "-", raw.lower()).strip("-_")
    return (key or "entry")[:63]


def settings_of(config: Config, mac: str, host: Optional[HostConfig]) -> HostSettings:
    """The effective settings of `mac` whose config entry is `host` (None: an unknown PC, which gets the
    settings of `dhcp.default_group` when one is set)."""
    if host is None:
        group = config.group(config.dhcp.default_group)
    else:
        group = config.group(host.group) if host.group else None
    if host is not None and host.images is not None:
        images = list(host.images)
    elif group is not None:
        images = list(group.images)
    else:
        images = [i.name for i in config.images]
    default = (host.default_image if host and host.default_image else None) or \
              (group.default_image if group else None)
    if default not in images:
        default = images[0] if images else None
    secureboot = host.secureboot if host and host.secureboot is not None else bool(group and group.secureboot)
    boot = (host.boot if host and host.boot else None) or \
        ("grub" if secureboot else (group.boot if group else "ipxe"))
    persistent = host.persistent if host and host.persistent is not None else bool(group and group.persistent)
    cmdline = " ".join(a.strip() for a in (group.cmdline if group else "", host.cmdline if host else "") if a.strip())
    return HostSettings(mac=mac, name=host.name if host else None, group=group.name if group else None,
                        images=tuple(images), default_image=default, boot=boot, persistent=persistent,
                        cmdline=cmdline, student_entries=_student_entries(config, group, host),
                        secureboot=secureboot)


def _student_entries(config: Config, group: Optional[GroupConfig], host: Optional[HostConfig]) -> tuple[str, ...]:
    """Host over group over menu.student_entries."""
    for chosen in (host.student_entries if host else None, group.student_entries if group else None):
        if chosen is not None:
            return tuple(chosen)
    return tuple(config.menu.student_entries)


def host_settings(config: Config, mac: str) -> HostSettings:
    """The effective settings of `mac` (unknown PCs included)."""
    mac = normalize_mac(mac)
    return settings_of(config, mac, config.host_by_mac(mac))


def anonymous_settings(config: Config) -> HostSettings:
    """A PC whose MAC is unknown (a menu asked for without one): no disk, pxelinux; the images, default
    and kernel arguments of `dhcp.default_group` when one is set, else every image."""
    if config.dhcp.default_group is not None:
        group = settings_of(config, "", None)
        return HostSettings(mac="", name=None, group=group.group, images=group.images,
                            default_image=group.default_image, boot="pxelinux", persistent=False,
                            cmdline=group.cmdline, student_entries=group.student_entries)
    names = tuple(i.name for i in config.images)
    return HostSettings(mac="", name=None, group=None, images=names, default_image=names[0] if names else None,
                        boot="pxelinux", persistent=False, student_entries=tuple(config.menu.student_entries))


S = TypeVar("S", bound=PlannedSnapshot)


def snapshot_choice(state: SnapshotState[S], mac: str, group: Optional[str], image: str) -> tuple[Optional[S], str]:
    """What `mac` boots of `image` and why: maintenance draft > pin > test > its group's current > all
    groups' current ('maintenance', 'pinned', 'test', 'group GROUP', 'all groups', 'nothing promoted')."""
    who = {"host": parse_mac(mac) or mac.lower(), "group": group or None, "all": ALL_GROUPS}
    for kind, whose, why in _PRECEDENCE:
        target = who[whose]
        if target is None:
            continue
        snap = state.assigned(image, kind, target)
        if snap is not None:
            return snap, (f"group {group}" if whose == "group" else why)
    return None, "nothing promoted"


def _label(snap: PlannedSnapshot) -> str:
    return f"v{snap.version}" if snap.version is not None else f"draft-{snap.id}"


def _group_current(state: SnapshotState[PlannedSnapshot], group: Optional[str],
                   image: str) -> Optional[PlannedSnapshot]:
    """What the host's group boots of `image`, ignoring pins, tests and maintenance."""
    return (state.assigned(image, "current", group) if group else None) or state.assigned(image, "current", ALL_GROUPS)


def boot_files(image: ImageConfig, state: Optional[SnapshotState[PlannedSnapshot]],
               snapshot_id: Optional[int]) -> tuple[str, str]:
    """(kernel, initrd) an entry boots: the config's for a client image, the snapshot's own for a native
    one (snapshots/bootfiles.py); a native snapshot without boot files names where they would be, so the
    PC's failed fetch says which snapshot lacks them."""
    if image.kind != "native" or snapshot_id is None or state is None:
        return image.kernel, image.initrd
    where = state.boot_dir_for(snapshot_id) or f"snapshots/{image.name}/{snapshot_id}"
    return f"{where}/vmlinuz", f"{where}/initrd.img"


def image_entries(config: Config, state: Optional[SnapshotState[PlannedSnapshot]],
                  host: HostSettings, importing: frozenset[str] = frozenset()) -> list[MenuEntry]:
    """Per image the host may boot: the snapshot it boots now (or the bare kernel when nothing is
    promoted; "still importing" when an import of it is running) and, when there is one, a "previous"
    entry: what a rollback would bring back, or for a pinned/testing/maintenance host what its group boots."""
    out: list[MenuEntry] = []
    for name in host.images:
        image = config.image(name)
        if image is None:
            continue
        title = image.title or name
        is_default = name == host.default_image
        if state is None or not host.mac:
            snap, why = None, ""
        else:
            snap, why = snapshot_choice(state, host.mac, host.group, name)
        if state is None or snap is None:  # nothing promoted (or no store): the kernel boots without a disk
            busy = name in importing
            out.append(MenuEntry(entry_key(name), name, f"{title} (still importing, no disk yet)" if busy else title,
                                 image.kernel, image.initrd, image.cmdline, default=is_default, importing=busy))
            continue
        tag = {"pinned": ", pinned", "test": ", test", "maintenance": ", maintenance (writable)"}.get(why, "")
        native = image.kind == "native"
        out.append(MenuEntry(entry_key(name), name, f"{title} ({_label(snap)}{tag})",
                             *boot_files(image, state, snap.id), image.cmdline, snapshot_id=snap.id,
                             version=snap.name, default=is_default, native=native))
        if why in ("pinned", "test", "maintenance"):
            prev = _group_current(state, host.group, name)
        else:
            prev = state.previous_for(host.group if why.startswith("group ") else ALL_GROUPS, name)
        if prev is not None and prev.id != snap.id:
            out.append(MenuEntry(entry_key(name, "prev"), name, f"{title} (previous: {_label(prev)})",
                                 *boot_files(image, state, prev.id), image.cmdline, snapshot_id=prev.id,
                                 version=prev.name, previous=True, native=native))
    return out


def assemble(config: Config, state: Optional[SnapshotState[PlannedSnapshot]], host: HostSettings,
             entries: list[MenuEntry]) -> BootPlan:
    """The plan from a host's candidate entries (the planner's, or an explicit catalog's): menu order
    (current entries, then previous ones), keys made unique, snapshots filled in from the store, the
    default entry, and the disks that follow from it."""
    notes: list[str] = []
    if not config.menu.previous_snapshot_entry:
        entries = [e for e in entries if not e.previous]
    entries = [e for e in entries if not e.previous] + [e for e in entries if e.previous]
    kept: list[MenuEntry] = []
    seen: set[str] = set()
    for e in entries:
        if e.key in seen or e.key in (LOCAL_KEY, ADMIN_KEY):
            notes.append(f"duplicate or reserved menu key {e.key!r} skipped")
            continue
        seen.add(e.key)
        if e.snapshot_id is None and state is not None and host.mac:
            snap, _ = snapshot_choice(state, host.mac, host.group, e.image)
            if snap is not None:
                image = config.image(e.image)
                kernel, initrd = boot_files(image, state, snap.id) if image is not None else (e.kernel, e.initrd)
                e = MenuEntry(e.key, e.image, e.title, kernel, initrd, e.cmdline, snap.id, e.version,
                              e.default, e.previous, native=image is not None and image.kind == "native")
        if e.native and e.snapshot_id is not None and state is not None and state.boot_dir_for(e.snapshot_id) is None:
            notes.append(f"image {e.image} boots its own kernel but snapshot {e.snapshot_id} carries none: "
                         f"bootctl snapshot kernel {e.snapshot_id}")
        if e.importing and e.snapshot_id is None:
            notes.append(f"image {e.image} is still importing: its entry has no disk until the import is done")
        kept.append(e)
    every = kept
    current = _pick_default(config, every)
    kept = [e for e in every if _student_kind(e, host, current) in host.student_entries]
    hidden = tuple(e for e in every if e not in kept)
    default = current if current in kept else _pick_default(config, kept)
    main = default.snapshot_id if default is not None else None
    extra = tuple(dict.fromkeys(e.snapshot_id for e in kept if e.snapshot_id is not None and e.snapshot_id != main))
    disk = DiskPlan(image=default.image if default is not None else None, snapshot_id=main,
                    persistent=host.persistent, extra=extra)
    return BootPlan(settings=host, entries=tuple(kept), default=default.key if default is not None else None,
                    disk=disk, notes=tuple(notes), hidden=hidden)


def _pick_default(config: Config, entries: list[MenuEntry]) -> Optional[MenuEntry]:
    """The entry booted when nobody picks one: the default image's, else the first non-previous one.
    An entry whose image is still importing boots no disk: never the default while another entry can be."""
    ready = [e for e in entries if not (e.importing and e.snapshot_id is None)]
    default = next((e for e in ready if e.default), None) or next((e for e in ready if not e.previous), None)
    if default is None and entries and not config.menu.local_disk_entry:
        default = (ready or entries)[0]  # only "previous" (or importing) entries and no local disk entry
    return default


def _student_kind(e: MenuEntry, host: HostSettings, current: Optional[MenuEntry]) -> str:
    """Which `student_entries` value shows `e`: previous, current (what the PC boots by default, its
    default image's entry) or images (the room's other images)."""
    if e.previous:
        return "previous"
    if e is current or e.image == host.default_image:
        return "current"
    return "images"


def plan_for(config: Config, state: Optional[SnapshotState[PlannedSnapshot]], mac: Optional[str],
             importing: frozenset[str] = frozenset()) -> BootPlan:
    """The boot plan of `mac` (None: a PC that did not say who it is: no snapshots, no disk).
    `importing`: images whose import is still running (their entries say so and are not the default)."""
    host = host_settings(config, mac) if mac else anonymous_settings(config)
    return assemble(config, state, host, image_entries(config, state if mac else None, host, importing))


class Planner:
    """`plan_for(config, snapshots, mac)` bound to the running daemon's config and snapshot store
    (read at every call); `ctx.planner`."""

    def __init__(self, sources: PlanSources):
        self.sources = sources

    def settings_for(self, mac: str) -> HostSettings:
        return host_settings(self.sources.config, mac)

    def plan_for(self, mac: Optional[str]) -> BootPlan:
        return plan_for(self.sources.config, self.sources.snapshots, mac, importing_images(self.sources.snapshot_jobs))

    def plan_with(self, host: HostSettings, entries: list[MenuEntry]) -> BootPlan:
        """The plan of `host` from an explicit catalog's entries (the Booter's catalog seam)."""
        return assemble(self.sources.config, self.sources.snapshots if host.mac else None, host, entries)
