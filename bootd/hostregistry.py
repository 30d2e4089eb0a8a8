"""Hosts as data: PCs registered at run time (bootctl host add|import|adopt|set|remove) beside the config's.

The rows live in the state store (`registered_hosts`); `Context.refresh_hosts` merges them into the
config in force with `bootplan.merge_hosts` (config hosts win), so DHCP, menus, peers, NBD and client
configs all read one host list. Every change is checked against the whole list first and written in
one transaction: a batch with one bad row changes nothing, and each bad row is named with its line.
"""
from __future__ import annotations

import csv
import io
import ipaddress
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from pydantic import ValidationError

from bootd.config import Config, HostConfig
from bootd.macaddr import normalize_mac, parse_mac
from bootd.service import Service

if TYPE_CHECKING:
    from bootd.daemon import Context

log = logging.getLogger("bootd.hosts")

OUI_FILE = "/usr/share/ieee-data/oui.txt"  # Debian package ieee-data (deps/debian-packages.txt, runtime)
CSV_COLUMNS = ("mac", "name", "group", "ip")
MAX_IMPORT_ROWS = 20000


class HostRegistryError(ValueError):
    """A refused change: `problems` holds one line per bad row or field (API: 400)."""

    def __init__(self, summary: str, problems: list[str]):
        super().__init__("\n".join([summary, *problems]) if problems else summary)
        self.summary = summary
        self.problems = problems


class HostNotFound(LookupError):
    """No registered host by that MAC or name (API: 404)."""


@dataclass(frozen=True)
class HostRow:
    """One registered host as written: a normalised MAC, a checked name, an existing group, a free address."""

    mac: str
    name: str
    group: Optional[str]
    ip: Optional[str]

    def as_dict(self) -> dict[str, Optional[str]]:
        return {"mac": self.mac, "name": self.name, "group": self.group, "ip": self.ip}


@dataclass(frozen=True)
class Candidate:
    """A row to check: where it came from (`where`: "line 12", "request") and its raw fields."""

    where: str
    mac: str
    name: str
    group: Optional[str]
    ip: Optional[str]


def _empty(value: Optional[str]) -> Optional[str]:
    value = (value or "").strip()
    return value or None


class Registry:
    """Checks and applies changes to the registered hosts against the config in force."""

    def __init__(self, ctx: "Context"):
        self.ctx = ctx

    @property
    def file_config(self) -> Config:
        return self.ctx.file_config

    def rows(self) -> dict[str, HostRow]:
        return {r["mac"]: HostRow(r["mac"], r["name"], r["group"], r["ip"]) for r in self.ctx.store.registered_hosts()}

    def find(self, ident: str) -> HostRow:
        """A registered host by MAC or name; HostNotFound if there is none."""
        rows = self.rows()
        mac = parse_mac(ident)
        if mac is not None and mac in rows:
            return rows[mac]
        for row in rows.values():
            if row.name == ident:
                return row
        raise HostNotFound(f"no registered host {ident!r}" + (
            " (it is a config file host: change it there)" if self._config_host(ident) else ""))

    def _config_host(self, ident: str) -> Optional[HostConfig]:
        mac = parse_mac(ident)
        return self.file_config.host_by_mac(mac) if mac else self.file_config.host_by_name(ident)

    # -- checking -----------------------------------------------------------------------------------
    def check(self, batch: list[Candidate], replacing: set[str]) -> tuple[list[HostRow], list[str]]:
        """The rows of `batch` checked against the config, the registered hosts (those whose MAC is in
        `replacing` may be overwritten) and each other: (good rows, one problem per bad row)."""
        cfg = self.file_config
        groups = {g.name for g in cfg.groups}
        own_ips = {iface.address.ip for iface in cfg.interfaces}
        served = [iface.subnet for iface in cfg.interfaces] + [r.subnet for r in cfg.dhcp.relay_subnets]
        others = [r for mac, r in self.rows().items() if mac not in replacing]
        names = {h.name: f"config host {h.mac}" for h in cfg.hosts} | \
                {r.name: f"registered host {r.mac}" for r in others}
        reserved = {r["ip"]: r["mac"] for r in self.ctx.store.dhcp_reservations()}  # bootctl reserve
        ips = {str(h.ip): f"config host {h.name}" for h in cfg.hosts if h.ip is not None} | \
              {r.ip: f"registered host {r.name}" for r in others if r.ip}
        macs = {h.mac: f"the config file (host {h.name})" for h in cfg.hosts} | \
               {r.mac: f"registered host {r.name}" for r in others}
        good: list[HostRow] = []
        problems: list[str] = []
        for c in batch:
            why: list[str] = []
            try:
                mac = normalize_mac(c.mac)
            except ValueError as e:
                mac = None
                why.append(str(e))
            group, ip_text = _empty(c.group), _empty(c.ip)
            try:
                HostConfig(mac=mac or "00:00:00:00:00:00", name=c.name.strip(), group=group)
            except ValidationError as e:
                why += [f"name {c.name.strip()!r}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors()]
            name = c.name.strip()
            if mac is not None and mac in macs:
                why.append(f"MAC {mac} is already {macs[mac]}")
            if name and name in names:
                why.append(f"name {name!r} is taken by {names[name]}")
            if group is not None and group not in groups:
                why.append(f"unknown group {group!r} (the config has: {', '.join(sorted(groups)) or 'none'})")
            ip: Optional[str] = None
            if ip_text is not None:
                try:
                    addr = ipaddress.IPv4Address(ip_text)
                    ip = str(addr)
                    if served and not any(addr in net for net in served):
                        why.append(f"{ip} is in no served subnet")
                    elif addr in own_ips:
                        why.append(f"{ip} is bootd's own address")
                    elif ip in ips:
                        why.append(f"{ip} is taken by {ips[ip]}")
                    elif reserved.get(ip, mac) != mac:
                        why.append(f"{ip} is reserved for {reserved[ip]} (bootctl reserve)")
                except ValueError:
                    why.append(f"not an IPv4 address: {ip_text!r}")
            if why:
                problems.append(f"{c.where}: " + "; ".join(why))
                continue
            assert mac is not None
            row = HostRow(mac, name, group, ip)
            good.append(row)
            macs[mac] = f"{c.where}'s host"
            names[name] = f"{c.where}'s host {mac}"
            if ip is not None:
                ips[ip] = f"{c.where}'s host {name}"
        return good, problems

    def _apply(self, put: list[HostRow], delete: tuple[str, ...] = ()) -> None:
        self.ctx.store.change_registered_hosts([r.as_dict() for r in put], list(delete))
        self.ctx.refresh_hosts()

    # -- changes ------------------------------------------------------------------------------------
    def add(self, mac: str, name: str, group: Optional[str], ip: Optional[str]) -> HostRow:
        good, problems = self.check([Candidate("host", mac, name, group, ip)], set())
        if problems:
            raise HostRegistryError("host not added", problems)
        self._apply(good)
        return good[0]

    def adopt(self, mac: str, group: Optional[str], name: Optional[str], ip: Optional[str]) -> HostRow:
        """Register a PC bootd has seen boot (`host list --unknown`); its name defaults to pc-<MAC digits>."""
        mac_n = parse_mac(mac)
        if mac_n is None:
            raise HostRegistryError("host not adopted", [f"not a MAC address: {mac!r}"])
        if self.ctx.store.host(mac_n) is None:
            raise HostNotFound(f"bootd has not seen {mac_n} boot (see bootctl host list --unknown)")
        return self.add(mac_n, name or "pc-" + mac_n.replace(":", ""), group, ip)

    def change(self, ident: str, name: Optional[str] = None, group: Optional[str] = None,
               ip: Optional[str] = None, clear_group: bool = False, clear_ip: bool = False) -> HostRow:
        """Rename, move to another group, re-address: only the fields given change."""
        old = self.find(ident)
        new = Candidate("host", old.mac, name if name is not None else old.name,
                        None if clear_group else group if group is not None else old.group,
                        None if clear_ip else ip if ip is not None else old.ip)
        good, problems = self.check([new], {old.mac})
        if problems:
            raise HostRegistryError(f"host {old.name} not changed", problems)
        self._apply(good)
        return good[0]

    def remove(self, ident: str) -> HostRow:
        old = self.find(ident)
        self._apply([], (old.mac,))
        return old

    def import_csv(self, text: str, dry_run: bool = False) -> dict[str, Any]:
        """Add (or replace, by MAC) every row of a CSV of mac,name,group,ip: all rows or, if any is bad,
        none; each bad row is reported with its line. An optional first line names the columns."""
        batch, problems = parse_csv(text)
        registered = self.rows()
        good, bad = self.check(batch, {c.mac for c in (_norm(b) for b in batch) if c.mac in registered})
        problems = sorted(problems + bad, key=_line_of)
        if problems:
            raise HostRegistryError(f"{len(problems)} bad rows of {len(batch) + len(problems) - len(bad)}: "
                                    "nothing imported", problems)
        added = sum(1 for r in good if r.mac not in registered)
        if not dry_run:
            self._apply(good)
        return {"rows": len(good), "added": added, "replaced": len(good) - added, "dry_run": dry_run,
                "hosts": [r.as_dict() for r in good]}

    # -- reading ------------------------------------------------------------------------------------
    def listing(self) -> dict[str, Any]:
        """Every host in force (config's and registered ones) and the registered ones that lost a conflict."""
        registered = self.rows()
        cfg = self.ctx.config
        hosts = [{"mac": h.mac, "name": h.name, "group": h.group, "ip": str(h.ip) if h.ip else None,
                  "source": "registered" if h.mac in registered and h.mac not in
                  {c.mac for c in self.file_config.hosts} else "config"} for h in cfg.hosts]
        in_force = {h.mac for h in cfg.hosts}
        left_out = [r.as_dict() | {"source": "registered (not in force)"} for r in registered.values()
                    if r.mac not in in_force or self.file_config.host_by_mac(r.mac) is not None]
        return {"hosts": hosts + left_out, "conflicts": list(self.ctx.host_conflicts)}

    def unknown(self) -> list[dict[str, Any]]:
        """PCs bootd has seen (DHCP, TFTP, HTTP) that no host entry names: first/last seen, vendor, arch."""
        known = {h.mac for h in self.ctx.config.hosts}
        return [{"mac": r["mac"], "first_seen": r["first_seen"], "last_seen": r["last_seen"], "last_ip": r["last_ip"],
                 "arch": r["arch"] or "unknown", "vendor": vendor_of(r["mac"])}
                for r in self.ctx.store.hosts() if r["mac"] not in known and parse_mac(r["mac"])]


def _line_of(problem: str) -> int:
    """The line a problem of `parse_csv`/`check` names ("line 12: ..."), for reporting in file order."""
    head = problem.split(":", 1)[0]
    return int(head[5:]) if head.startswith("line ") and head[5:].isdigit() else 0


def _norm(c: Candidate) -> Candidate:
    mac = parse_mac(c.mac)
    return Candidate(c.where, mac or c.mac, c.name, c.group, c.ip)


def parse_csv(text: str) -> tuple[list[Candidate], list[str]]:
    """Rows of mac,name[,group[,ip]] with the line each ends on; blank lines and '#' lines are skipped,
    a first line naming the columns too. Returns (candidates, problems of the rows that are not rows)."""
    out: list[Candidate] = []
    problems: list[str] = []
    reader = csv.reader(io.StringIO(text))
    first = True
    try:
        for cells in reader:
            line = reader.line_num
            cells = [c.strip() for c in cells]
            if not any(cells) or cells[0].startswith("#"):
                continue
            if first and [c.lower() for c in cells[:2]] == ["mac", "name"]:
                first = False
                continue
            first = False
            if len(cells) < 2 or len(cells) > len(CSV_COLUMNS):
                problems.append(f"line {line}: {len(cells)} fields, want {', '.join(CSV_COLUMNS)} (group, ip optional)")
                continue
            cells += [""] * (len(CSV_COLUMNS) - len(cells))
            out.append(Candidate(f"line {line}", cells[0], cells[1], cells[2], cells[3]))
            if len(out) > MAX_IMPORT_ROWS:
                problems.append(f"line {line}: more than {MAX_IMPORT_ROWS} rows: split the file")
                break
    except csv.Error as e:
        problems.append(f"line {reader.line_num}: {e}")
    return out, problems


# -- vendors from the MAC's OUI (IEEE registry, read once when first asked) ----------------------------
_oui_cache: Optional[tuple[float, dict[str, str]]] = None


def _oui_table() -> dict[str, str]:
    """OUI (6 hex digits) -> organisation, from ieee-data's oui.txt; {} when it is not installed."""
    global _oui_cache
    try:
        mtime = os.stat(OUI_FILE).st_mtime
    except OSError:
        return {}
    if _oui_cache is not None and _oui_cache[0] == mtime:
        return _oui_cache[1]
    table: dict[str, str] = {}
    with open(OUI_FILE, encoding="utf-8", errors="replace") as f:
        for line in f:
            if "(hex)" in line:
                prefix, _, org = line.partition("(hex)")
                digits = prefix.strip().replace("-", "").lower()
                if len(digits) == 6:
                    table[digits] = org.strip()
    _oui_cache = (mtime, table)
    return table


def vendor_of(mac: str) -> str:
    """The maker a MAC's OUI names; 'random (locally administered)' for such MACs, 'unknown' otherwise."""
    digits = mac.replace(":", "").lower()
    if len(digits) != 12:
        return "unknown"
    if int(digits[:2], 16) & 0x02:
        return "random (locally administered)"
    return _oui_table().get(digits[:6], "unknown")


class HostRegistryService(Service):
    """Holds nothing that runs: it says in the status when a registered host lost to a config host."""

    name = "hosts"

    async def start(self, ctx: "Context") -> None:
        self.ctx = ctx
        for conflict in ctx.host_conflicts:
            log.warning("hosts: %s", conflict)

    async def stop(self) -> None:
        return None

    async def reload(self, ctx: "Context") -> None:
        self.ctx = ctx  # the daemon merged the registered hosts into the new config already
        for conflict in ctx.host_conflicts:
            log.warning("hosts: %s", conflict)

    def status(self) -> dict[str, Any]:
        return {"registered": len(self.ctx.store.registered_hosts()), "conflicts": len(self.ctx.host_conflicts)}

    def warning(self) -> Optional[str]:
        conflicts = self.ctx.host_conflicts
        if not conflicts:
            return None
        return f"{len(conflicts)} registered host conflicts (bootctl host list): " + "; ".join(conflicts[:3])
