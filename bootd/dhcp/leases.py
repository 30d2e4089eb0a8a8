"""The lease table: an in-memory index over the `leases` rows of the state store.

Reads are dict lookups (the hot path never queries SQLite); every change that a client may rely on
(a bound lease, a release, a decline) is written to the store first and only then applied in memory,
so an ACK never leaves for a lease the store does not hold. Offers are held in memory only: an offer
that is lost in a crash was never promised.

One exception, on purpose: when the state store's filesystem is full (SQLITE_FULL after the store
has already given up its space reserve) the change is applied in memory, the reply goes out, and the
statements wait in `unsaved` to be written first by the next commit (or `save_unsaved`, every 10 s).
A full disk must not stop DHCP for the whole lab; the cost is that a crash in that window forgets
those leases (clients keep their addresses and re-confirm them at renewal). Any other store error
still drops the replies.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, TypedDict

from bootd.state import StateStore, disk_full

log = logging.getLogger("bootd.dhcp")

UNSAVED_MAX = 50_000  # statements kept in memory while the store's filesystem is full; past it: refused

BOUND, RELEASED, DECLINED = "bound", "released", "declined"

Statement = tuple[str, tuple[object, ...]]
"""One SQL statement and its parameters, queued for the next commit."""


class LeaseDict(TypedDict):
    """A lease as the API shows it (Lease.as_dict)."""

    ip: str
    mac: str
    state: str
    expires: float
    client_id: Optional[str]
    hostname: Optional[str]
    updated: float


@dataclass(slots=True)
class Lease:
    ip: str
    mac: str
    state: str
    expires: float
    client_id: Optional[str] = None
    hostname: Optional[str] = None
    updated: float = 0.0

    def as_dict(self) -> LeaseDict:
        return {"ip": self.ip, "mac": self.mac, "state": self.state, "expires": self.expires,
                "client_id": self.client_id, "hostname": self.hostname, "updated": self.updated}


_UPSERT = ("INSERT INTO leases(ip, mac, client_id, hostname, state, expires, updated) VALUES (?,?,?,?,?,?,?) "
           "ON CONFLICT(ip) DO UPDATE SET mac=excluded.mac, client_id=excluded.client_id, "
           "hostname=excluded.hostname, state=excluded.state, expires=excluded.expires, updated=excluded.updated")
# A binding: written only if the address is free in the database (no row, or a row whose time is over) or
# already this MAC's. Another server (or process) sharing the database may have bound it since this
# table was loaded; then the statement changes no row and the whole commit is refused (LeaseTaken).
_BIND = _UPSERT + " WHERE leases.mac = excluded.mac OR leases.expires <= excluded.updated"


class LeaseTaken(Exception):
    """The database holds a live lease of the address for another MAC (written by another server)."""


class LeaseTable:
    """Leases by IP and by MAC, persisted through the state store; offers held in memory."""

    def __init__(self, store: StateStore):
        self.store = store
        self.by_ip: dict[str, Lease] = {}
        self.by_mac: dict[str, Lease] = {}  # the MAC's bound (or last released) lease
        self.offers: dict[str, tuple[str, float]] = {}  # ip -> (mac, held until)
        self.offer_by_mac: dict[str, str] = {}  # mac -> ip
        self._pending: Optional[list[Statement]] = None
        # bumped whenever an address may have become free (a pool's "exhausted" verdict is then stale)
        self.freed = 0
        self.unsaved: list[Statement] = []  # applied in memory, not yet in the store (disk full)
        self.unsaved_since: Optional[float] = None
        self.load()

    # -- writing -----------------------------------------------------------------------------------
    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group the writes of several packets into one transaction (a group commit).

        The caller sends the replies only after this block exits without error: every ACK still
        leaves after its lease is in the store, but a burst of clients costs one commit, not one each.
        On a failed commit the memory index is reloaded from the store and the error propagates."""
        if self._pending is not None:  # nested: the outer batch commits
            yield
            return
        self._pending = []
        try:
            yield
        finally:
            pending, self._pending = self._pending, None
            if pending:
                self._commit(pending)

    def _exec(self, stmts: list[Statement]) -> None:
        if self._pending is not None:
            self._pending.extend(stmts)
        else:
            self._commit(stmts)

    def _commit(self, stmts: list[Statement]) -> None:
        todo = self.unsaved + stmts
        try:
            with self.store.transaction() as cur:
                for sql, params in todo:
                    if cur.execute(sql, params).rowcount == 0 and sql is _BIND:
                        raise LeaseTaken(f"{params[0]} is leased to another MAC in the state database "
                                         f"(another server bound it): not given to {params[1]}")
        except Exception as e:
            if disk_full(e) and len(todo) <= UNSAVED_MAX:  # see the module docstring
                if self.unsaved_since is None:
                    self.unsaved_since = time.time()
                    log.error("dhcp: the state store's filesystem is full; serving leases from memory "
                              "until it can write again (%s)", e)
                self.unsaved = todo
                return
            self.unsaved, self.unsaved_since = [], None
            self.offers.clear()
            self.offer_by_mac.clear()
            self.load()  # memory must not claim what the store does not hold
            raise
        except BaseException:
            self.unsaved, self.unsaved_since = [], None
            self.offers.clear()
            self.offer_by_mac.clear()
            self.load()  # memory must not claim what the store does not hold
            raise
        if self.unsaved:
            log.info("dhcp: %d lease change(s) kept in memory since %s are in the state store now",
                     len(self.unsaved), time.strftime("%H:%M:%S", time.localtime(self.unsaved_since)))
            self.unsaved, self.unsaved_since = [], None

    def load(self) -> None:
        self.by_ip.clear()
        self.by_mac.clear()
        for r in self.store.query("SELECT ip, mac, client_id, hostname, state, expires, updated FROM leases "
                                  "ORDER BY updated"):
            lease = Lease(r["ip"], r["mac"], r["state"], r["expires"], r["client_id"], r["hostname"], r["updated"])
            self.by_ip[lease.ip] = lease
            if lease.state in (BOUND, RELEASED):
                self.by_mac[lease.mac] = lease

    def save_unsaved(self) -> bool:
        """Write what a full filesystem kept in memory only; True once nothing is left unsaved."""
        if self.unsaved and self._pending is None:
            self._commit([])
        return not self.unsaved

    # -- queries -------------------------------------------------------------------------------
    def holder(self, ip: str, now: float) -> Optional[str]:
        """The MAC that currently holds `ip` (a live lease, a quarantine, or an offer), else None.

        A declined address is held by the empty string: nobody may have it until the quarantine ends."""
        lease = self.by_ip.get(ip)
        if lease is not None and lease.expires > now:
            if lease.state == BOUND:
                return lease.mac
            if lease.state == DECLINED:
                return ""
        offer = self.offers.get(ip)
        if offer is not None and offer[1] > now:
            return offer[0]
        return None

    def lease_for(self, mac: str) -> Optional[Lease]:
        return self.by_mac.get(mac)

    def ever_used(self, ip: str) -> bool:
        return ip in self.by_ip or ip in self.offers

    def active(self, now: float) -> list[Lease]:
        return [lease for lease in self.by_ip.values() if lease.expires > now]

    # -- offers (memory only) ----------------------------------------------------------------------
    def hold_offer(self, ip: str, mac: str, until: float) -> None:
        old = self.offer_by_mac.get(mac)
        if old is not None and old != ip:
            self.offers.pop(old, None)
        self.offers[ip] = (mac, until)
        self.offer_by_mac[mac] = ip

    def drop_offer(self, mac: str) -> None:
        ip = self.offer_by_mac.pop(mac, None)
        if ip is not None:
            o = self.offers.get(ip)
            if o is not None and o[0] == mac:
                del self.offers[ip]
                self.freed += 1

    def expire_offers(self, now: float) -> int:
        gone = [ip for ip, (_, until) in self.offers.items() if until <= now]
        for ip in gone:
            mac, _ = self.offers.pop(ip)
            if self.offer_by_mac.get(mac) == ip:
                del self.offer_by_mac[mac]
        self.freed += len(gone)
        return len(gone)

    # -- changes (store first, then memory) ------------------------------------------------------
    def bind(self, ip: str, mac: str, expires: float, now: float, client_id: Optional[str] = None,
             hostname: Optional[str] = None) -> Lease:
        """Persist a bound lease (and retire the MAC's previous address) before anyone is told."""
        prev = self.by_mac.get(mac)
        stmts: list[Statement] = []
        if prev is not None and prev.ip != ip and self.by_ip.get(prev.ip) is prev:
            stmts.append(("DELETE FROM leases WHERE ip=? AND mac=?", (prev.ip, mac)))
        stmts.append((_BIND, (ip, mac, client_id, hostname, BOUND, expires, now)))
        self._exec(stmts)
        if prev is not None and prev.ip != ip and self.by_ip.get(prev.ip) is prev:
            del self.by_ip[prev.ip]
            self.freed += 1
        old = self.by_ip.get(ip)
        if old is not None and old.mac != mac and self.by_mac.get(old.mac) is old:
            del self.by_mac[old.mac]
        lease = Lease(ip, mac, BOUND, expires, client_id, hostname, now)
        self.by_ip[ip] = lease
        self.by_mac[mac] = lease
        self.drop_offer(mac)
        return lease

    def release(self, ip: str, mac: str, now: float) -> bool:
        lease = self.by_ip.get(ip)
        if lease is None or lease.mac != mac or lease.state != BOUND:
            return False
        self._exec([("UPDATE leases SET state=?, expires=?, updated=? WHERE ip=?", (RELEASED, now, now, ip))])
        lease.state, lease.expires, lease.updated = RELEASED, now, now
        self.freed += 1
        return True

    def decline(self, ip: str, mac: str, until: float, now: float) -> None:
        """Quarantine `ip` (some other machine answers on it) until `until`."""
        self._exec([(_UPSERT, (ip, mac, None, None, DECLINED, until, now))])
        prev = self.by_ip.get(ip)
        if prev is not None and self.by_mac.get(prev.mac) is prev:
            del self.by_mac[prev.mac]
        self.by_ip[ip] = Lease(ip, mac, DECLINED, until, None, None, now)
        self.drop_offer(mac)
