"""What each PC is doing, read from its boot events and its disk connection: the one place that says
"booting", "up", "failed" or "off" (the API's /api/v1/hosts and /api/v1/rooms, `bootctl hosts`,
`bootctl rooms` all read it from here).

A failed boot step is one boot event of kind "failed" whose detail names the step (kernel, initrd,
loader, dhcp, disk...) and a reason an admin can act on ("kernel vmlinuz-x: not found over HTTP");
`record_failure` writes it and logs it at WARNING with the host's name, whoever noticed the failure
(TFTP, HTTP, DHCP, the NBD gatekeeper).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Protocol

from bootd.bootnames import program_of

if TYPE_CHECKING:
    from bootd.daemon import Context

log = logging.getLogger("bootd.boot")

FAILED = "failed"  # the event kind of a failed boot step
BOOT_GAP = 300.0  # a DHCP request this long after a boot's first event starts a new boot (as the timeline)
BOOTING_WINDOW = 300.0  # a boot whose last event is older than this and that never came up is over
EVENTS_READ = 200  # events per host read to derive its state (a boot is a few dozen at most)
_DHCP_KINDS = ("dhcp", "proxydhcp")
_UP_KINDS = ("kernel", "initrd")  # both fetched whole: the PC runs its OS (or its disk says so)
STATES = ("booting", "up", "failed", "off")


class FailureLog(Protocol):
    """The part of the state store (bootd/state.py StateStore) a failure is written to."""

    def record_event(self, mac: Optional[str], kind: str, detail: Optional[dict[str, object]] = None,
                     nbytes: Optional[int] = None, duration: Optional[float] = None) -> None: ...


def record_failure(store: FailureLog, mac: Optional[str], step: str, reason: str, *,
                   host: Optional[str] = None, **detail: object) -> None:
    """One "failed" boot event for `mac` and one WARNING naming the host. A store that fails costs the
    event, never the caller's answer to the PC (the warning is logged either way)."""
    who = host or mac or str(detail.get("client") or "unknown client")
    log.warning("boot of %s failed: %s", who, reason, extra={"mac": mac})
    try:
        store.record_event(mac, FAILED, {"step": step, "reason": reason, **detail})
    except Exception as e:
        log.error("cannot record the failed boot step of %s: %s", who, e)


def host_name(ctx: "Context", mac: Optional[str]) -> Optional[str]:
    """The configured name of `mac`, else the name the PC reported (hosts table), else None."""
    if not mac:
        return None
    cfg = ctx.config.host_by_mac(mac)
    if cfg is not None:
        return cfg.name
    row = ctx.store.host(mac)
    return str(row["name"]) if row and row.get("name") else None


@dataclass
class BootSummary:
    """What the events of one host say about its latest boot."""

    state: str = "off"
    last_error: Optional[str] = None
    last_error_at: Optional[float] = None
    boot_started: Optional[float] = None
    last_boot_duration: Optional[float] = None
    snapshot: Optional[str] = None
    chain: list[dict[str, str]] = field(default_factory=list)  # the latest boot's loader chain, in order
    step: Optional[str] = None  # while booting: the latest boot's last step (dhcp, loader, menu, kernel...)

    def as_dict(self) -> dict[str, object]:
        return {"state": self.state, "last_error": self.last_error, "last_error_at": self.last_error_at,
                "boot_started": self.boot_started, "last_boot_duration": self.last_boot_duration,
                "snapshot": self.snapshot, "chain": self.chain, "step": self.step}


def _boots(events: list[dict]) -> list[list[dict]]:
    """Events (oldest first) cut into boots: a DHCP event more than BOOT_GAP after the current boot's
    first event, or any event after BOOT_GAP of silence, starts the next one; so does a DHCP request for a
    boot file once the current boot has handed over to its OS (kernel and initrd fetched whole): the PC
    was switched off and on again (the OS's own DHCP asks for no boot file)."""
    boots: list[list[dict]] = []
    fetched: set[str] = set()
    for e in events:
        if not boots:
            boots.append([e])
            fetched = set()
            continue
        cur = boots[-1]
        last_ts = cur[-1].get("last_ts") or cur[-1]["ts"]
        dhcp = e["kind"] in _DHCP_KINDS
        rebooted = dhcp and (e.get("detail") or {}).get("file") and fetched.issuperset(_UP_KINDS)
        if (dhcp and e["ts"] - cur[0]["ts"] > BOOT_GAP) or e["ts"] - last_ts > BOOT_GAP or rebooted:
            boots.append([e])
            fetched = set()
        else:
            cur.append(e)
        if e["kind"] in _UP_KINDS and _complete(e):
            fetched.add(e["kind"])
    return boots


def latest_boot(events: list[dict]) -> list[dict]:
    """The events (oldest first) of the latest boot among `events` (the PC page's timeline)."""
    boots = _boots(events)
    return boots[-1] if boots else []


def _end(e: dict) -> float:
    return float(e.get("last_ts") or e["ts"]) + float(e.get("duration") or 0.0)


def _complete(e: dict) -> bool:
    """A fetch that delivered the whole file (TFTP outcome, HTTP status)."""
    d = e.get("detail") or {}
    return d.get("outcome", "complete") == "complete" and d.get("status", 200) == 200


AFTER_UP_STEPS = ("client",)  # failures a PC reports once its OS runs (its screen did not come up)


def _after_up_failure(e: dict) -> bool:
    """A failure the running client root reported (its screen), not a failed step of the boot itself."""
    return e["kind"] == FAILED and (e.get("detail") or {}).get("step") in AFTER_UP_STEPS


def _boot_failure(e: dict) -> bool:
    return e["kind"] == FAILED and not _after_up_failure(e)


def screen_failure(boot: list[dict]) -> Optional[dict]:
    """The client root's latest report in this boot when it is a failure ("client" step: its units did not
    start, bootd-client.service failed); None when it reported its screen started since, or nothing."""
    last = None
    for e in boot:
        if e["kind"] == "client":
            last = None
        elif _after_up_failure(e):
            last = e
    return last


def _came_up(boot: list[dict]) -> Optional[float]:
    """When the boot handed over to the OS: the kernel and the initrd both fetched whole after the
    boot's last failure; None if that has not happened (yet)."""
    after_failure = boot
    for i, e in enumerate(boot):
        if _boot_failure(e):
            after_failure = boot[i + 1:]
    fetched = {e["kind"]: _end(e) for e in after_failure if e["kind"] in _UP_KINDS and _complete(e)}
    return max(fetched.values()) if all(k in fetched for k in _UP_KINDS) else None


_CHAIN_KINDS = ("loader", "script", "menu", "kernel", "initrd")


def loader_chain(boot: list[dict]) -> list[dict[str, str]]:
    """What ran, in order, in one boot: every boot program (shim, grub, ipxe, pxelinux), menu, kernel and
    initrd fetched whole, with the protocol that carried it (a Secure Boot PC: shim -> grub -> menu ->
    kernel -> initrd)."""
    out: list[dict[str, str]] = []
    for e in boot:
        if e["kind"] not in _CHAIN_KINDS or not _complete(e):
            continue
        d = e.get("detail") or {}
        path = str(d.get("path") or d.get("file") or "").lstrip("/")
        step = {"step": program_of(path) if e["kind"] == "loader" else e["kind"], "path": path,
                "proto": str(d.get("proto") or d.get("protocol") or "")}
        if not out or out[-1] != step:
            out.append(step)
    return out


def _retried(boot: list[dict], failure: dict) -> bool:
    """The step that failed was fetched whole afterwards (a PC retrying, this time with luck)."""
    step = (failure.get("detail") or {}).get("step")
    later = boot[boot.index(failure) + 1:]
    return any(e["kind"] == step and _complete(e) for e in later)


def summarize(events: list[dict], connected: bool = False, now: Optional[float] = None,
              up_for: float = 3600.0) -> BootSummary:
    """The state of one host from its events (oldest first) and whether its disk is connected now.
    failed: the latest boot's last failure was not followed by the OS coming up, or the client root
    reported that the PC's screen did not come up (its latest "client" report); up: its NBD disk is
    connected, or (no disk in this boot) kernel and initrd arrived less than `up_for` (the lease time)
    ago; booting: events in the last BOOTING_WINDOW; off: anything else."""
    now = time.time() if now is None else now
    out = BootSummary()
    for e in events:
        d = e.get("detail") or {}
        if e["kind"] == FAILED:
            out.last_error, out.last_error_at = str(d.get("reason") or "failed"), float(e["ts"])
        if e["kind"] == "disk" and d.get("action") == "boot" and d.get("snapshot"):
            out.snapshot = str(d["snapshot"])
    boots = _boots(events)
    for boot in boots:
        up_at = _came_up(boot)
        if up_at is not None:
            out.last_boot_duration = round(up_at - boot[0]["ts"], 3)
    if not boots:
        out.state = "up" if connected else "off"
        return out
    boot = boots[-1]
    out.boot_started = float(boot[0]["ts"])
    out.chain = loader_chain(boot)
    up_at = _came_up(boot)
    failures = [e for e in boot if _boot_failure(e)]
    recent = now - max(_end(e) for e in boot) <= BOOTING_WINDOW
    uses_disk = any(e["kind"] == "disk" and (e.get("detail") or {}).get("action") == "boot" for e in boot)
    if failures and up_at is None and not connected and not _retried(boot, failures[-1]):
        out.state = "failed"
    elif screen_failure(boot) is not None:
        out.state = "failed"  # the OS runs, its disk is connected, but the PC's screen did not come up
    elif connected:
        out.state = "up"
    elif up_at is not None and not uses_disk and now - up_at <= up_for:
        out.state = "up"
    else:
        out.state = "booting" if recent else "off"
    if out.state == "booting":
        steps = [e for e in boot if e["kind"] not in (FAILED, "admin")]
        out.step = _step_name(steps[-1]) if steps else None
    return out


def _step_name(e: dict) -> str:
    """A boot event as the step a PC is at: 'dhcp', 'loader ipxe', 'menu', 'kernel', 'disk'..."""
    if e["kind"] == "loader":
        d = e.get("detail") or {}
        return f"loader {program_of(str(d.get('path') or d.get('file') or ''))}".strip()
    return "dhcp" if e["kind"] in _DHCP_KINDS else str(e["kind"])


def host_rows(ctx: "Context") -> list[dict]:
    """Every configured host, then every host only seen, with what the hosts table knows of it."""
    seen = {h["mac"]: h for h in ctx.store.hosts()}
    out = []
    for h in ctx.config.hosts:
        row = {"mac": h.mac, "name": h.name, "ip": str(h.ip) if h.ip else None, "group": h.group,
               "configured": True, "first_seen": None, "last_seen": None, "last_ip": None, "arch": None}
        s = seen.pop(h.mac, None)
        if s:
            row.update({k: s[k] for k in ("first_seen", "last_seen", "last_ip", "arch")})
        out.append(row)
    for mac, s in sorted(seen.items()):
        out.append({"mac": mac, "name": s["name"], "ip": None, "group": None, "configured": False,
                    "first_seen": s["first_seen"], "last_seen": s["last_seen"], "last_ip": s["last_ip"],
                    "arch": s["arch"]})
    return out


async def disk_connections(ctx: "Context") -> dict[str, dict]:
    """mac -> its main disk entry (snapshot, connected) while disks over NBD run; empty otherwise."""
    disks = ctx.disks
    if disks is None:
        return {}
    try:
        entries = await disks.list()
    except Exception as e:  # the hosts view must not die with the storage daemon
        log.warning("hosts: cannot read the disk connections: %s", e)
        return {}
    return main_disks(entries)


def main_disks(entries: list[dict]) -> dict[str, dict]:
    """mac -> its main disk entry among a disk listing (a connected one first)."""
    out: dict[str, dict] = {}
    for entry in entries:
        if entry.get("main") and (entry["mac"] not in out or entry.get("connected")):
            out[entry["mac"]] = entry
    return out


def with_state(ctx: "Context", row: dict, disk: Optional[dict], now: Optional[float] = None) -> dict:
    """`row` with state, snapshot, last_boot_duration, last_error (and when) of its host."""
    events = ctx.store.events(row["mac"], limit=EVENTS_READ)
    summary = summarize(events, connected=bool(disk and disk.get("connected")), now=now,
                        up_for=float(ctx.config.dhcp.lease_time))
    if disk and disk.get("snapshot") and (disk.get("connected") or summary.snapshot is None):
        summary.snapshot = str(disk["snapshot"])
    return {**row, **summary.as_dict()}


async def host_states(ctx: "Context") -> list[dict]:
    """host_rows with each host's state (see with_state)."""
    disks = await disk_connections(ctx)
    now = time.time()
    return [with_state(ctx, row, disks.get(row["mac"]), now) for row in host_rows(ctx)]


async def room_summary(ctx: "Context") -> list[dict]:
    """Per group (room) of the config, plus the hosts in none: how many PCs are in each state, how many
    are up on which snapshot, and which failed with what."""
    rooms: dict[str, dict] = {}
    for g in ctx.config.groups:
        rooms[g.name] = _room(g.name)
    for h in await host_states(ctx):
        name = h["group"] or "-"
        room = rooms.setdefault(name, _room(name))
        room["hosts"] += 1
        room["states"][h["state"]] += 1
        if h["state"] == "up":
            snap = h["snapshot"] or "-"
            room["up_on"][snap] = room["up_on"].get(snap, 0) + 1
        if h["state"] == "failed":
            room["failed"].append({"name": h["name"], "mac": h["mac"], "last_error": h["last_error"]})
    return list(rooms.values())


def _room(name: str) -> dict:
    return {"room": name, "hosts": 0, "states": {s: 0 for s in STATES}, "up_on": {}, "failed": []}
