"""AccessPolicy: which exports a peer of the NBD port may list and open - only its own host's.

The gatekeeper (gatekeeper.py) asks it at every handshake. Who a peer is comes from a live binding of
its address (the daemon's `owner_of`: bootd/peers.py mac_at), never from an old address of a host."""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Optional

from nbdexport.exports import ExportSet

log = logging.getLogger("bootd.nbd")


class AccessPolicy:
    """A host lists and opens only its own exports (the gatekeeper's policy)."""

    def __init__(self, exports: ExportSet, configured_ips: Callable[[str], Iterable[str]],
                 owner_of: Optional[Callable[[str], Optional[str]]] = None):
        self.exports = exports
        self.configured_ips = configured_ips
        self.owner_of = owner_of or self._configured_owner  # who is at an address (the daemon: peers.mac_at)

    def peer_mac(self, peer_ip: str) -> Optional[str]:
        """The MAC at the peer's address by a live binding (bootd/peers.py: configured ip, live lease,
        fresh neighbour entry; None when unknown or when they disagree). Never an old address."""
        try:
            mac = self.owner_of(peer_ip)
        except Exception as e:  # no answer is no identity: refused
            log.debug("owner_of(%s): %s", peer_ip, e)
            return None
        return mac.lower() if mac else None

    def _configured_owner(self, peer_ip: str) -> Optional[str]:
        """Without a daemon's owner_of (a bare DiskManager): the host configured at that address."""
        macs = {r.mac for r in self.exports.rows.values() if peer_ip in set(self.configured_ips(r.mac) or ())}
        return macs.pop() if len(macs) == 1 else None

    def exports_for_peer(self, peer_ip: str) -> list[str]:
        mac = self.peer_mac(peer_ip)
        return [r.name for r in self.exports.rows.values() if mac is not None and r.mac == mac]

    def may_open(self, peer_ip: str, name: str) -> bool:
        """Only the owner opens; its open counts as activity (a draft's release waits for a disconnect)."""
        row = self.exports.rows.get(name)
        if row is None or self.peer_mac(peer_ip) != row.mac:
            return False
        row.opened = True
        row.last_active = time.time()
        return True
