"""Who is asking: a per-host file (menu, iPXE script, client config) goes only to that host.

A host's menu carries its secret NBD export token, and fetching it starts a new boot (a fresh disk
overlay), so another PC that knows the MAC must neither read the token nor reset the disk. A request
is the host's own when its peer address is the host's configured `ip`, holds the host's lease, or the
kernel's neighbour table maps it to the host's MAC. Requests on the admin API socket are the admin's.
`menu.owner_only: false` turns the check off for networks where none of these can be known (e.g. a
routed client without a bootd lease).
"""
from __future__ import annotations

import logging
from typing import Optional

from bootd.tftp.server import NeighbourTable

log = logging.getLogger("bootd.peers")

NEIGHBOURS = NeighbourTable()


def owner_of(ctx, peer_ip: Optional[str]) -> Optional[str]:
    """The MAC the peer address belongs to: configured host, lease, then the neighbour table."""
    if not peer_ip:
        return None
    for h in ctx.config.hosts:
        if h.ip is not None and str(h.ip) == peer_ip:
            return h.mac
    mac = None
    try:
        mac = ctx.store.mac_for_ip(peer_ip)
    except Exception as e:  # the store must not break a boot
        log.debug("mac_for_ip(%s) failed: %s", peer_ip, e)
    return (mac or NEIGHBOURS.lookup(peer_ip) or "").lower() or None


def may_act_for(ctx, peer_ip: Optional[str], mac: Optional[str], site: str = "boot") -> bool:
    """True if the request from `peer_ip` may fetch the per-host files of `mac`."""
    if site == "unix" or not getattr(ctx.config.menu, "owner_only", True) or mac is None:
        return True
    mac = mac.lower()
    if owner_of(ctx, peer_ip) == mac:
        return True
    # The lease may name another MAC for a reused address while the neighbour table is current.
    return NEIGHBOURS.lookup(peer_ip or "") == mac


def refuse(ctx, proto: str, peer_ip: Optional[str], mac: str, what: str) -> None:
    ctx.metrics.inc(proto, "refused", reason="not-the-host")
    log.warning("%s: %s asked for %s of %s, which is not its own: refused", proto, peer_ip, what, mac,
                extra={"mac": mac})
