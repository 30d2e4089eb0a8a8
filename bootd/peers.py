"""Who is at an address: the one answer TFTP, HTTP and the NBD gatekeeper all use.

A host's menu carries its secret NBD export token, fetching it starts a new boot (a fresh disk overlay),
and its export is its disk: so the peer address of a request must identify the MAC by a binding that
holds *now*, never by history. `who_is_at(ctx, ip)` decides, in this order:

  1. a configured host whose `ip` is this address            -> that MAC ("config")
  2. else an unexpired bound lease of bootd's DHCP server    -> that MAC ("lease")
  3. else a fresh neighbour entry (bootd/neighbours.py: REACHABLE/DELAY/PROBE/PERMANENT, or STALE
     learned within 60 s)                                    -> that MAC ("neighbour")

and refuses (mac None, "conflict") when live bindings disagree: the configuration and a lease naming
different MACs, the kernel's fresh neighbour entry naming a MAC other than the configured one or the
lease's (another machine answers on that address: someone took it, or asked bootd's DHCP for a lease
under a MAC that is not its own), or two fresh neighbour entries with different MACs.
`hosts.last_ip`, released leases and expired leases never count: a host that left keeps nothing.

Requests on the admin API socket are the admin's. `menu.owner_only: false` turns the check off for
networks where none of these can be known (e.g. a routed client without a bootd lease).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Protocol

from bootd.neighbours import NeighbourTable

if TYPE_CHECKING:
    from bootd.daemon import Context

log = logging.getLogger("bootd.peers")

NEIGHBOURS = NeighbourTable()


class LeaseLookup(Protocol):
    """What binding_at asks of the state store (bootd/state.py StateStore): the live lease on an address."""

    def mac_for_ip(self, ip: str, now: Optional[float] = None) -> Optional[str]: ...


@dataclass(frozen=True)
class Binding:
    """The MAC at an address and how it is known; `mac` is None when nobody is, or on a conflict."""

    mac: Optional[str]
    source: str  # "config" | "lease" | "neighbour" | "none" | "conflict"
    detail: str = ""

    @property
    def conflict(self) -> bool:
        return self.source == "conflict"


def binding_at(ip: Optional[str], *, configured: Callable[[str], Optional[str]] = lambda ip: None,
               store: Optional[LeaseLookup] = None, neighbours: Optional[NeighbourTable] = None,
               now: Optional[float] = None) -> Binding:
    """The decision of the module docstring, on explicit parts (for a server without a daemon context).

    `configured(ip)` is the MAC configured at `ip`; `store` answers `mac_for_ip(ip, now)` (live leases
    only); `neighbours` is the kernel's table (None: not consulted)."""
    if not ip:
        return Binding(None, "none")
    now = time.time() if now is None else now
    live: list[tuple[str, str]] = []  # (source, mac)
    mac = configured(ip)
    if mac:
        live.append(("config", mac.lower()))
    if store is not None:
        try:
            mac = store.mac_for_ip(ip, now=now)
        except Exception as e:  # the store must not break a boot; no answer is no binding
            log.debug("mac_for_ip(%s) failed: %s", ip, e)
            mac = None
        if mac:
            live.append(("lease", mac.lower()))
    seen = set(neighbours.fresh_macs(ip)) if neighbours is not None else set()
    macs = {m for _, m in live}
    if len(macs) > 1 or len(seen) > 1 or (macs and seen and seen != macs):
        said = [f"{src} {m}" for src, m in live] + [f"neighbour {m}" for m in sorted(seen)]
        return Binding(None, "conflict", ", ".join(said))
    if live:
        return Binding(live[0][1], live[0][0])
    if seen:
        return Binding(seen.pop(), "neighbour")
    return Binding(None, "none")


def configured_mac(ctx: Context, ip: str) -> Optional[str]:
    """The MAC of the configured host whose `ip` is this address."""
    for h in ctx.config.hosts:
        if h.ip is not None and str(h.ip) == ip:
            return h.mac
    return None


def who_is_at(ctx: Context, ip: Optional[str]) -> Binding:
    """Who is at `ip` now, by the running daemon's config, leases and neighbour table."""
    return binding_at(ip, configured=lambda a: configured_mac(ctx, a), store=ctx.store, neighbours=NEIGHBOURS)


def mac_at(ctx: Context, ip: Optional[str]) -> Optional[str]:
    """The MAC at `ip` by a live binding, or None (unknown, or live bindings disagree)."""
    return who_is_at(ctx, ip).mac


def resolver(store: Optional[LeaseLookup] = None, configured: Callable[[str], Optional[str]] = lambda ip: None,
             neighbours: Optional[NeighbourTable] = None) -> Callable[[str], Optional[str]]:
    """`ip -> MAC` by the same rules, for a server run without a daemon (e.g. `python -m bootd.tftp`)."""
    table = neighbours or NEIGHBOURS

    def mac_of(ip: str) -> Optional[str]:
        return binding_at(ip, configured=configured, store=store, neighbours=table).mac
    return mac_of


def may_act_for(ctx: Context, peer_ip: Optional[str], mac: Optional[str], site: str = "boot") -> bool:
    """True if the request from `peer_ip` may fetch the per-host files of `mac`."""
    if site == "unix" or not ctx.config.menu.owner_only or mac is None:
        return True
    return mac_at(ctx, peer_ip) == mac.lower()


def refuse(ctx: Context, proto: str, peer_ip: Optional[str], mac: str, what: str) -> None:
    b = who_is_at(ctx, peer_ip)
    ctx.metrics.inc(proto, "refused", reason="not-the-host")
    why = f"bindings disagree: {b.detail}" if b.conflict else f"it is {b.mac or 'unknown'} ({b.source})"
    log.warning("%s: %s asked for %s of %s, which is not its own (%s): refused", proto, peer_ip, what, mac, why,
                extra={"mac": mac})

