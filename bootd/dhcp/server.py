"""The asyncio side of DHCP: sockets per served interface, the link watcher, counters and events.

One UDP socket per configured interface on port 67 (plus 4011 in proxy mode), each pinned to its
interface with SO_BINDTODEVICE, so nothing is ever answered on an interface the config does not name.
Packets are read straight from the socket in the loop's reader callback (all that wait, up to
READ_BATCH) and answered in the same callback: no thread hops, no per-packet tasks. Under a flood
(issue 13) `ratelimit.Admission` drops what one MAC sends past its rate and what strangers send past
their shared budget of CPU time, before it is decoded. Under a boot storm (issue 22) `triage` answers
the newest packets first and skips those nobody waits for any more (older than `dhcp.stale_after`,
or a DISCOVER/REQUEST its client has since repeated); known MACs of each batch go before strangers.
Every skipped packet is counted as dropped{reason=...}. Interfaces are tracked with a
pyroute2 netlink watcher: one that disappears and comes back (even with a new ifindex) is served again.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import time
from typing import TYPE_CHECKING, Callable, Optional

from bootd.authenticode import grub_has_http
from bootd.dhcp.codec import BOOTP_MIN, MESSAGE_TYPE_NAMES, DhcpDecodeError, DhcpMessage, decode, encode
from bootd.dhcp.leases import LeaseTable
from bootd.dhcp.policy import PROXY_PORT, SERVER_PORT, DhcpPolicy, Outcome
from bootd.dhcp.ratelimit import Admission
from bootd.dhcp.rogue import is_probe
from bootd.dhcp.triage import Received, triage
from bootd.hoststate import FAILED
from bootd.macaddr import normalize_mac
from bootd.service import Service
from bootd.udpbatch import Datagrams, send_many

if TYPE_CHECKING:
    from bootd.daemon import Context
    from bootd.ra import RouterAdvertiser

log = logging.getLogger("bootd.dhcp")

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
SO_RCVBUFFORCE, SO_SNDBUFFORCE = 33, 32
SO_TIMESTAMPNS = SCM_TIMESTAMPNS = 35  # Linux: each datagram's arrival time as a struct timespec
TIMESPEC = struct.Struct("=qq")
CMSG_SPACE = socket.CMSG_SPACE(TIMESPEC.size)
# A bounded receive queue (issue 13): a deep one (it was 16 MB), served first in first out, turned a
# flood into seconds of latency for every client. Since issue 22 a batch is served newest first and
# what waited past dhcp.stale_after is skipped unread, so queue depth no longer means latency; the
# queue holds a room's burst (~1500 requests) while the CPU is busy elsewhere instead of dropping the
# newest requests at the tail. What does not fit is dropped by the kernel and counted
# (dropped{reason=queue}); what is read is admitted by ratelimit.Admission before any work.
RECV_BUFFER = 2 << 20
SEND_BUFFER = 1 << 20
QUEUE_DROPS_EVERY = 1.0  # seconds between readings of the kernel's drop counters
SIOCSARP = 0x8955
ATF_COM = 0x02
READ_BATCH = 2048  # datagrams read per reader wake-up: triage needs to see what waits to pick the newest
RECV_SIZE = 4096  # DHCP messages are 300..1500 bytes; anything longer is cut here and fails to decode
EXPIRE_EVERY = 10.0

Datagram = tuple[bytes, tuple[str, int]]
"""One received packet and its source address."""
Decision = tuple[DhcpMessage, Outcome, float]
"""A decoded packet, what the policy made of it, and when (DhcpService.decide)."""


def open_udp(ifname: str, port: int) -> socket.socket:
    """A non-blocking UDP socket on 0.0.0.0:port that only sees and sends on `ifname`."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, ifname.encode())
        # ~1000 requests of a room booting at once fit; a flood beyond that is dropped, not delayed
        for force, plain, size in ((SO_RCVBUFFORCE, socket.SO_RCVBUF, RECV_BUFFER),
                                   (SO_SNDBUFFORCE, socket.SO_SNDBUF, SEND_BUFFER)):
            try:
                s.setsockopt(socket.SOL_SOCKET, force, size)  # beyond rmem_max: needs CAP_NET_ADMIN
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, plain, size)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)  # arrival times for triage (stale packets)
        s.bind(("0.0.0.0", port))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def set_neighbour(sock: socket.socket, ifname: str, ip: str, mac: bytes) -> bool:
    """Teach the kernel `ip` is at `mac` on `ifname`, so a reply can go unicast to a client that has
    no address yet (RFC 2131 4.1) instead of broadcast."""
    pa = struct.pack("!HH4s8x", socket.AF_INET, 0, socket.inet_aton(ip))
    ha = struct.pack("=H6s8x", 1, mac[:6])
    req = pa + ha + struct.pack("=i", ATF_COM) + bytes(16) + ifname.encode()[:15].ljust(16, b"\0")
    try:
        import fcntl
        fcntl.ioctl(sock.fileno(), SIOCSARP, req)
        return True
    except OSError:
        return False


class InterfaceSockets:
    """The sockets DHCP holds on one interface, and the ifindex they were bound under."""

    def __init__(self, name: str, ifindex: int, socks: dict[int, socket.socket]):
        self.name = name
        self.ifindex = ifindex
        self.socks = socks  # port -> socket


class DhcpService(Service):
    name = "dhcp"

    def __init__(self, clock: Callable[[], float] = time.time,
                 send: Callable[[socket.socket, Datagrams], list[Optional[int]]] = send_many) -> None:
        self.clock = clock
        self.send = send  # how a batch of replies leaves (bootd/udpbatch.py)
        self.ctx: Optional["Context"] = None
        self.policy: Optional[DhcpPolicy] = None
        self.leases: Optional[LeaseTable] = None
        self.secureboot_http = False  # the signed GRUB in the boot root has HTTP (_check_secureboot_grub)
        self.bound: dict[str, InterfaceSockets] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._tasks: list[asyncio.Task[None]] = []
        self.ra: Optional[RouterAdvertiser] = None
        self._missing_logged: set[str] = set()
        self._counts: dict[tuple[str, Optional[tuple[str, str]]], int] = {}
        self.admission: Optional[Admission] = None
        self._queue_drops: dict[int, int] = {}  # socket inode -> drops the kernel counted so far
        self._queue_drops_read = 0.0

    # -- what start() sets up: each raises before start (a caller's bug), so none is None below ---------
    def _context(self) -> Context:
        if self.ctx is None:
            raise RuntimeError("the DHCP service is not started")
        return self.ctx

    def _policy(self) -> DhcpPolicy:
        if self.policy is None:
            raise RuntimeError("the DHCP service is not started")
        return self.policy

    def _leases(self) -> LeaseTable:
        if self.leases is None:
            raise RuntimeError("the DHCP service is not started")
        return self.leases

    def _admission(self) -> Admission:
        if self.admission is None:
            raise RuntimeError("the DHCP service is not started")
        return self.admission

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the DHCP service is not started")
        return self._loop

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self, ctx: "Context") -> None:
        self.ctx = ctx
        self._loop = asyncio.get_running_loop()
        self.leases = LeaseTable(ctx.store)
        if ctx.cluster is not None:  # several servers: a standby that takes DHCP over reads the leases first
            ctx.cluster.takeover_listeners.append(self._on_takeover)
            ctx.cluster.refresh_listeners.append(self._build_policy)  # reservations another server made
        self._check_secureboot_grub()
        self._build_policy()
        self._apply_event_limits()
        ctx.metrics.add_gauges("dhcp", self._gauges)
        self._sync_interfaces()
        self._tasks.append(asyncio.create_task(self._watch_links(), name="dhcp-links"))
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="dhcp-housekeeping"))
        if ctx.config.dhcp.router_advertisements and ctx.config.interfaces:
            from bootd.ra import RouterAdvertiser
            self.ra = RouterAdvertiser([i.name for i in ctx.config.interfaces], ctx.metrics)
            self.ra.start(self._loop)

    def _on_takeover(self) -> None:
        """This server answers DHCP from now on: what the other server leased is in the database, not in
        this one's memory (bootd/cluster.py)."""
        if self.leases is not None:
            self.leases.offers.clear()
            self.leases.offer_by_mac.clear()
            self.leases.load()
            self.leases.freed += 1
            self._build_policy()  # and the reservations, as they are in the database now
            log.info("dhcp: answering now; %d lease(s) read from the state database", len(self.leases.by_ip))

    async def stop(self) -> None:
        if self.ctx is not None and self.ctx.cluster is not None:
            for listeners, fn in ((self.ctx.cluster.takeover_listeners, self._on_takeover),
                                  (self.ctx.cluster.refresh_listeners, self._build_policy)):
                try:
                    listeners.remove(fn)
                except ValueError:
                    pass
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        for name in list(self.bound):
            self._close_interface(name)
        if self.ra is not None:
            self.ra.stop()
            self.ra = None

    async def reload(self, ctx: "Context") -> None:
        self.ctx = ctx
        self._check_secureboot_grub()
        self._build_policy()
        self._apply_event_limits()
        self._sync_interfaces()
        want_ra = ctx.config.dhcp.router_advertisements and ctx.config.interfaces
        names = [i.name for i in ctx.config.interfaces]
        if self.ra is not None and (not want_ra or self.ra.interfaces != names):
            self.ra.stop()
            self.ra = None
        if want_ra and self.ra is None:
            from bootd.ra import RouterAdvertiser
            self.ra = RouterAdvertiser(names, ctx.metrics)
            self.ra.start(self._event_loop())

    def status(self) -> dict[str, object]:
        now = self.clock()
        return {"mode": self.ctx.config.dhcp.mode if self.ctx else "off",
                "interfaces": sorted(self.bound),
                "leases": len(self.leases.active(now)) if self.leases else 0}

    def _gauges(self) -> dict[str, float]:
        now = self.clock()
        return {"active_leases": float(len(self.leases.active(now))) if self.leases else 0.0,
                "unsaved_lease_changes": float(len(self.leases.unsaved)) if self.leases else 0.0,
                "interfaces_bound": float(len(self.bound))}

    def _check_secureboot_grub(self) -> None:
        """Whether the signed GRUB in the boot root speaks HTTP: read once per start and reload (the boot
        root is stocked just before), not at every policy rebuild (a reservation change rebuilds it)."""
        cfg = self._context().config
        self.secureboot_http = grub_has_http(cfg.http_root / cfg.dhcp.loaders.secureboot_grub)

    def _build_policy(self) -> None:
        assert self.ctx is not None and self.leases is not None
        rows = self.ctx.store.dhcp_reservations()
        self.policy = DhcpPolicy(self.ctx.config, self.leases, {r["mac"]: r["ip"] for r in rows},
                                 secureboot_http=self.secureboot_http)
        rl = self.ctx.config.dhcp.rate_limit
        self.admission = Admission(rl.per_mac, rl.per_mac_burst, rl.unknown_cpu, rl.unknown_answers,
                                   rl.unknown_answers_burst, now=self.clock())

    def _apply_event_limits(self) -> None:
        """The boot-event log's bounds (config `events`). DHCP writes most of its rows and its
        housekeeping prunes it, so it also hands the store the limits."""
        ctx = self._context()
        ev = ctx.config.events
        ctx.store.set_event_limits(ev.retention, ev.max_rows, ev.coalesce, ev.audit_retention)

    # -- run-time reservations ---------------------------------------------------------------------
    def reservations(self) -> list[dict[str, object]]:
        ctx = self._context()
        out: list[dict[str, object]] = [{"mac": h.mac, "ip": str(h.ip), "name": h.name, "source": "config"}
                                        for h in ctx.config.hosts if h.ip is not None]
        for r in ctx.store.dhcp_reservations():
            out.append({"mac": r["mac"], "ip": r["ip"], "name": r["name"], "source": "store", "created": r["created"]})
        return out

    def add_reservation(self, mac: str, ip: str, name: Optional[str] = None) -> dict[str, Optional[str]]:
        """Reserve `ip` for `mac` in the store. ValueError for bad input, LookupError for a conflict."""
        import ipaddress
        mac = normalize_mac(mac)
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            raise ValueError(f"not an IPv4 address: {ip!r}") from None
        ctx, policy = self._context(), self._policy()
        if not any(s.contains(int(addr)) for s in policy.subnets) and \
                not any(addr in i.subnet for i in ctx.config.interfaces):
            raise ValueError(f"{addr} is in no served subnet")
        if int(addr) in policy.own_ips:
            raise ValueError(f"{addr} is bootd's own address")
        ip = str(addr)
        configured = ctx.config.host_by_mac(mac)
        if configured is not None and configured.ip is not None:
            raise LookupError(f"{mac} has a reservation in the config file")
        owner = policy.reserved_ips.get(ip)
        if owner is not None and owner != mac:
            raise LookupError(f"{ip} is reserved for {owner}")
        holder = self._leases().holder(ip, self.clock())
        if holder not in (None, mac):
            raise LookupError(f"{ip} is leased to {holder or 'nobody (declined, in quarantine)'}")
        ctx.store.put_dhcp_reservation(mac, ip, name, time.time())
        self._build_policy()
        return {"mac": mac, "ip": ip, "name": name}

    def remove_reservation(self, mac: str) -> bool:
        mac = normalize_mac(mac)
        removed = self._context().store.delete_dhcp_reservation(mac)
        self._build_policy()
        return removed

    # -- interfaces --------------------------------------------------------------------------------
    def _ports(self) -> list[int]:
        mode = self._context().config.dhcp.mode
        if mode == "off":
            return []
        return [SERVER_PORT, PROXY_PORT] if mode == "proxy" else [SERVER_PORT]

    def _sync_interfaces(self) -> None:
        """Bind every configured interface that exists; drop sockets of vanished or unlisted ones."""
        ctx = self._context()
        cfg = ctx.config
        wanted = {i.name for i in cfg.interfaces} if self._ports() else set()
        for name in list(self.bound):
            cur = self.bound[name]
            idx = _ifindex(name)
            if name not in wanted or idx != cur.ifindex or set(cur.socks) != set(self._ports()):
                if name in wanted and idx != cur.ifindex:
                    log.warning("dhcp: interface %s is %s", name, "gone" if idx is None else "new")
                self._close_interface(name)
        for name in sorted(wanted - set(self.bound)):
            idx = _ifindex(name)
            if idx is None:
                if name not in self._missing_logged:
                    log.warning("dhcp: interface %s does not exist (yet); serving it once it appears", name)
                    self._missing_logged.add(name)
                continue
            socks: dict[int, socket.socket] = {}
            try:
                for port in self._ports():
                    socks[port] = open_udp(name, port)
            except OSError as e:
                for s in socks.values():
                    s.close()
                log.error("dhcp: cannot listen on %s: %s", name, e)
                ctx.metrics.inc("dhcp", "bind_errors")
                continue
            self._missing_logged.discard(name)
            self.bound[name] = InterfaceSockets(name, idx, socks)
            loop = self._event_loop()
            for port, s in socks.items():
                loop.add_reader(s.fileno(), self._on_readable, s, name, port)
            log.info("dhcp (%s) listening on %s ports %s", cfg.dhcp.mode, name, ",".join(map(str, socks)))

    def _close_interface(self, name: str) -> None:
        cur = self.bound.pop(name, None)
        if cur is None:
            return
        for s in cur.socks.values():
            try:
                self._event_loop().remove_reader(s.fileno())
            except (ValueError, OSError):
                pass
            s.close()
        log.info("dhcp stopped listening on %s", name)

    async def _watch_links(self) -> None:
        """Re-sync on every netlink link event; poll as a backstop if netlink is unavailable."""
        try:
            from pyroute2 import AsyncIPRoute
            from pyroute2.netlink.rtnl import RTMGRP_LINK
        except ImportError:  # pragma: no cover - pyroute2 is a dependency
            AsyncIPRoute = None
        if AsyncIPRoute is not None:
            try:
                async with AsyncIPRoute() as ipr:
                    await ipr.bind(groups=RTMGRP_LINK)
                    self._sync_interfaces()
                    while True:
                        async for _msg in ipr.get():
                            pass
                        self._sync_interfaces()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("dhcp: netlink watcher failed (%s); polling interfaces instead", e)
        while True:
            await asyncio.sleep(2.0)
            self._sync_interfaces()

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_EVERY)
            try:
                now = self.clock()
                self._leases().expire_offers(now)
                self._sync_interfaces()  # backstop for a missed netlink event
                self._context().store.enforce_event_limits(now)  # an idle log ages out too
                self._count_queue_drops(now)
                self._flush_counts()
                self._leases().save_unsaved()  # leases a full filesystem kept in memory only (leases.py)
            except Exception as e:  # never let housekeeping die
                log.error("dhcp housekeeping: %s", e)

    # -- packets -------------------------------------------------------------------------------------
    def _on_readable(self, sock: socket.socket, ifname: str, port: int) -> None:
        """Read what the socket holds (up to READ_BATCH), decide the packets of known MACs first and
        strangers' only while their budget lasts, each newest first (`triage`), commit the lease
        changes in one transaction, then send the replies (none of them before the commit) and record
        their boot events."""
        now = self.clock()
        cluster = self._context().cluster
        if cluster is not None and not cluster.confirm_dhcp():  # a standby: another server answers
            self._drain_as_standby(sock)
            return
        known, strangers = self._read_batch(sock, ifname, now)
        admission = self._admission()
        decided: list[Decision] = []
        cpu = time.thread_time  # strangers pay for the CPU they take, not for time the scheduler gave others
        try:
            with self._leases().batch():
                for data, src in known:
                    r = self.decide(data, src, ifname, port)
                    if r is not None:
                        decided.append(r)
                n_known = len(decided)
                for data, src in strangers:
                    refused = admission.strangers_may_work(self.clock())
                    if refused is not None:
                        self._count("received")
                        self._count("dropped", ("reason", refused))
                        continue
                    t = cpu()
                    r = self.decide(data, src, ifname, port)
                    if r is not None:
                        decided.append(r)
                    admission.charge_strangers(cpu() - t, 0 if r is None else 1)
        except Exception as e:  # the store refused the batch: nothing it promised may go out
            self._context().metrics.inc("dhcp", "errors", float(max(1, len(decided))))
            log.error("dhcp: cannot persist leases, %d replies dropped: %s", len(decided), e)
            self._flush_counts()
            return
        t = cpu()
        self.send_replies(decided, sock, ifname)  # one system call; known PCs' replies first in it
        self._record_events(decided)
        if len(decided) > n_known:  # strangers pay their share of sending and recording
            admission.charge_strangers((cpu() - t) * (len(decided) - n_known) / len(decided))
        if now - self._queue_drops_read >= QUEUE_DROPS_EVERY:
            self._count_queue_drops(now)
        self._flush_counts()

    def _drain_as_standby(self, sock: socket.socket) -> None:
        """Read and drop what the socket holds: counted as dropped{reason=standby}."""
        n = 0
        for _ in range(READ_BATCH):
            try:
                sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            n += 1
        if n:
            self._count("received", n=n)
            self._count("dropped", ("reason", "standby"), n)
            self._flush_counts()

    def _read_batch(self, sock: socket.socket, ifname: str, now: float) -> tuple[list[Datagram], list[Datagram]]:
        """Up to READ_BATCH datagrams, triaged (newest first, stale and superseded ones skipped) and
        split into those from known MACs (host entry, reservation, lease or offer) and the rest; a MAC
        over its own rate is counted and dropped here, undecoded."""
        admit = self._admission().admit
        count = self._count
        wall = time.time()
        got: list[Received] = []
        for _ in range(READ_BATCH):
            try:
                data, anc, _flags, src = sock.recvmsg(RECV_SIZE, CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.debug("dhcp recv on %s: %s", ifname, e)
                break
            refused = admit(data[28:34], now)  # BOOTP chaddr; a shorter packet is malformed and a stranger
            if refused is not None:
                count("received")
                count("dropped", ("reason", refused))
                continue
            at = wall
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == SCM_TIMESTAMPNS and len(value) >= TIMESPEC.size:
                    sec, nsec = TIMESPEC.unpack_from(value)
                    at = sec + nsec * 1e-9
            got.append(Received(data, src, at))
        fresh, stale, superseded = triage(got, wall, self._policy().dhcp.stale_after)
        for reason, n in (("stale", stale), ("superseded", superseded)):
            if n:
                self._count("received", n=n)
                self._count("dropped", ("reason", reason), n)
        known: list[Datagram] = []
        strangers: list[Datagram] = []
        policy, leases = self._policy(), self._leases()
        by_mac, offer_by_mac = leases.by_mac, leases.offer_by_mac
        for p in fresh:
            chaddr = p.data[28:34]
            mac = chaddr.hex(":") if len(chaddr) == 6 else ""
            if mac and (policy.known(mac) or mac in by_mac or mac in offer_by_mac):
                known.append((p.data, p.src))
            else:
                strangers.append((p.data, p.src))
        return known, strangers

    def _count_queue_drops(self, now: float) -> None:
        """Datagrams the kernel dropped because our receive queue was full: /proc/net/udp counts them
        per socket (the last column), read at most once a second."""
        self._queue_drops_read = now
        inodes = {}
        for cur in self.bound.values():
            for s in cur.socks.values():
                try:
                    inodes[os.fstat(s.fileno()).st_ino] = 0
                except OSError:
                    pass
        if not inodes:
            return
        try:
            with open("/proc/self/net/udp") as f:
                lines = f.readlines()[1:]
        except OSError:
            return
        for line in lines:
            parts = line.split()
            if len(parts) >= 13 and parts[9].isdigit() and int(parts[9]) in inodes:
                inodes[int(parts[9])] = int(parts[-1])
        new = 0
        for inode, drops in inodes.items():
            new += max(0, drops - self._queue_drops.get(inode, 0))
        self._queue_drops = inodes
        if new:
            self._count("dropped", ("reason", "queue"), new)

    def _count(self, name: str, label: Optional[tuple[str, str]] = None, n: int = 1) -> None:
        """Count locally; `_flush_counts` hands the sums to ctx.metrics once per batch (cheaper)."""
        k = (name, label)
        c = self._counts
        c[k] = c.get(k, 0) + n

    def _flush_counts(self) -> None:
        if not self._counts:
            return
        metrics = self._context().metrics
        for (name, label), n in self._counts.items():
            if label is None:
                metrics.inc("dhcp", name, n)
            else:
                metrics.inc("dhcp", name, n, **{label[0]: label[1]})
        self._counts.clear()

    def decide(self, data: bytes, src: tuple[str, int], ifname: str, port: int) -> Optional[Decision]:
        """Decode and run the policy; returns (msg, outcome, now) or None if there is nothing to do."""
        count = self._count
        if is_probe(data):  # bootd's own look for other servers (bootd/dhcp/rogue.py): not a PC
            count("ignored", ("reason", "own-probe"))
            return None
        count("received")
        try:
            msg = decode(data)
        except DhcpDecodeError as e:
            count("malformed")
            log.debug("dhcp: malformed packet from %s on %s: %s", src, ifname, e)
            return None
        policy = self._policy()
        iface = policy.interfaces.get(ifname)
        if iface is None:
            count("ignored", ("reason", "interface-not-served"))
            return None
        now = self.clock()
        try:
            out = policy.handle(msg, iface, port, now, src)
        except DhcpDecodeError as e:
            count("malformed")
            log.debug("dhcp: malformed option from %s on %s: %s", src, ifname, e)
            return None
        except Exception as e:  # a bug: no reply (never an unpersisted ACK)
            count("errors")
            log.error("dhcp: cannot handle %r from %s: %s", msg, src, e, exc_info=log.isEnabledFor(logging.DEBUG))
            return None
        if out.reply is None:
            count("ignored", ("reason", out.ignored or "unknown"))
            if out.event is None:
                return None
        return msg, out, now

    def send_replies(self, decided: list[Decision], sock: socket.socket, ifname: str) -> None:
        """The replies of a batch, in order, in one sendmmsg() (bootd/udpbatch.py): one system call, so
        one chance for the scheduler to take the CPU away, instead of one per reply. A reply that
        cannot be encoded or sent costs that reply only."""
        out_box: list[tuple[bytes, tuple[str, int]]] = []
        kinds: list[str] = []
        for msg, out, _when in decided:
            reply = out.reply
            if reply is None:
                continue
            try:
                payload = encode(reply, BOOTP_MIN)
                dest = out.dest
                if dest is None:  # the policy gives every reply its destination (DhcpPolicy._destination)
                    raise ValueError(f"the policy left the reply to {msg.mac} without a destination")
            except Exception as e:  # a bug must cost one reply, not the batch or the reader
                self._count("errors")
                log.error("dhcp: cannot send the reply to %r: %s", msg, e)
                continue
            if out.link_unicast and not set_neighbour(sock, ifname, dest[0], msg.chaddr):
                dest = ("255.255.255.255", dest[1])
            out_box.append((payload, dest))
            kinds.append(MESSAGE_TYPE_NAMES.get(reply.options[53][0], "?"))
        for (_payload, dest), kind, err in zip(out_box, kinds, self.send(sock, out_box), strict=True):
            if err is None:
                self._count("answered", ("type", kind))
                continue
            if err not in (errno.EAGAIN, errno.ENOBUFS):
                log.warning("dhcp: cannot send to %s on %s: %s", dest, ifname, os.strerror(err))
            self._count("send_errors")

    def _record_events(self, decided: list[Decision]) -> None:
        """The boot events of a batch in one transaction (the store coalesces repeats and keeps the
        log within its row cap); a failure costs the events, never the replies already sent."""
        events = [(out, out.event, when) for _, out, when in decided if out.event is not None]
        if not events:
            return
        store = self._context().store
        try:
            with store.transaction():
                for out, event, when in events:
                    store.record_event(out.mac, out.event_kind, event, ts=when)
                    mac = out.mac
                    if mac is None:  # never: every outcome names the client it is about (DhcpMessage.mac)
                        continue
                    if out.event_kind == FAILED:
                        log.warning("boot of %s failed: %s", self._host_name(mac) or mac,
                                    event["reason"], extra={"mac": mac})
                    fw = out.firmware
                    ip = event.get("ip")  # the policy's events carry the bound address as a str
                    store.touch_host(mac, ip=ip if isinstance(ip, str) else None,
                                     arch=fw.arch if fw and fw.arch != "unknown" else None,
                                     name=self._host_name(mac), now=when)
        except Exception as e:
            self._count("errors")
            log.error("dhcp: cannot record %d boot events: %s", len(events), e)

    def _host_name(self, mac: str) -> Optional[str]:
        h = self.policy.hosts.get(mac) if self.policy else None
        return h.name if h else None


def _ifindex(name: str) -> Optional[int]:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None
