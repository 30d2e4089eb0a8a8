"""What to answer a DHCP message: the decisions, without sockets or clocks of its own.

`DhcpPolicy.handle(msg, iface, port, now)` returns an `Outcome`: the reply to send and where, or the
reason the message is ignored, plus the boot event worth recording. Modes:
- full: addresses from pools (per served interface, or per relayed subnet) and reservations (config
  `hosts[].ip` and the store's `dhcp_reservations`), leases persisted before the ACK, renew/rebind,
  RELEASE, DECLINE (quarantine), INFORM, relayed requests (reply to giaddr, option 82 echoed);
- proxy: no addresses; PXE/HTTP clients get boot information on port 67 and on port 4011;
- off: nothing.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from typing import Optional

from bootd.bootplan import HostSettings, settings_of
from bootd.config import Config, HostConfig
from bootd.dhcp.codec import (
    ACK,
    BOOTREPLY,
    BOOTREQUEST,
    DECLINE,
    DISCOVER,
    INFORM,
    MESSAGE_TYPE_NAMES,
    NAK,
    OFFER,
    RELEASE,
    REQUEST,
    DhcpMessage,
)
from bootd.dhcp.firmware import Firmware, identify, loader_for
from bootd.dhcp.leases import BOUND, LeaseTable

PROXY_PORT = 4011
CLIENT_PORT, SERVER_PORT = 68, 67
# iPXE option 175 carrying 176 (no-pxedhcp) = 1: do not wait for ProxyDHCP offers.
IPXE_NO_PXEDHCP = b"\xb0\x01\x01"
# PXE option 43: discovery control (6) = 8, "boot from the file name in this offer, no menu/discovery".
PXE_VENDOR_BOOT_FILE = b"\x06\x01\x08\xff"

_U32 = struct.Struct("!I")
_MTYPE = {t: bytes((t,)) for t in range(1, 9)}
_inet_aton = socket.inet_aton


def _ip2int(ip: str) -> int:
    n: int = _U32.unpack(_inet_aton(ip))[0]
    return n


def _int2ip(n: int) -> str:
    return socket.inet_ntoa(_U32.pack(n))


class ServedInterface:
    """An interface DHCP answers on: its name and bootd's own address there (with prefix)."""

    __slots__ = ("name", "address", "ip", "ip_bytes")

    def __init__(self, name: str, address: ipaddress.IPv4Interface):
        self.name = name
        self.address = address
        self.ip = str(address.ip)  # read for every reply: computed once
        self.ip_bytes = address.ip.packed


@dataclass
class Subnet:
    """An address range bootd hands out, with the options its clients get."""

    network: ipaddress.IPv4Network
    interface: str  # the served interface its requests arrive on
    start: int
    end: int
    router: Optional[str] = None
    dns: list[str] = field(default_factory=list)
    domain: Optional[str] = None
    cursor: int = 0
    # a full scan found no free address: until then (and while no address is freed) do not scan again
    exhausted_until: float = 0.0
    exhausted_at_freed: int = -1

    def __post_init__(self) -> None:
        self.cursor = self.start
        self.mask = _inet_aton(str(self.network.netmask))
        self.net_int = int(self.network.network_address)
        self.mask_int = int(self.network.netmask)

    def contains(self, ip_int: int) -> bool:
        return (ip_int & self.mask_int) == self.net_int

    def in_range(self, ip_int: int) -> bool:
        return self.start <= ip_int <= self.end


FAILED_STEP = "failed"  # the event kind of a failed boot step (bootd/hoststate.py FAILED, a layer above)


@dataclass(slots=True)
class Outcome:
    reply: Optional[DhcpMessage] = None
    dest: Optional[tuple[str, int]] = None  # where to send the reply
    broadcast: bool = False  # dest is the limited broadcast on the interface
    link_unicast: bool = False  # dest is a client without an address yet: needs a neighbour entry
    ignored: Optional[str] = None  # why nothing is sent (counted with this reason)
    event: Optional[dict[str, object]] = None  # boot event detail to record for `mac`
    event_kind: str = "dhcp"
    mac: Optional[str] = None
    firmware: Optional[Firmware] = None


class DhcpPolicy:
    """Answers for one config. Rebuilt on reload; the lease table outlives it."""

    def __init__(self, config: Config, leases: LeaseTable, store_reservations: Optional[dict[str, str]] = None,
                 secureboot_http: bool = False):
        self.config = config
        # the signed GRUB in the boot root can fetch over HTTP (Secure Boot rooms may UEFI-HTTP-boot)
        self.secureboot_http = secureboot_http
        self.dhcp = config.dhcp
        self.mode = config.dhcp.mode
        self.leases = leases
        self.hosts: dict[str, HostConfig] = {h.mac: h for h in config.hosts}
        # mac -> ip reservations; config wins over the store on conflicts
        self.reservations: dict[str, str] = {}
        for mac, ip in (store_reservations or {}).items():
            self.reservations[mac.lower()] = ip
        for h in config.hosts:
            if h.ip is not None:
                self.reservations[h.mac] = str(h.ip)
        self.reserved_ips: dict[str, str] = {ip: mac for mac, ip in self.reservations.items()}
        self.interfaces = {i.name: ServedInterface(i.name, i.address) for i in config.interfaces}
        self.own_ips = {int(i.address.ip) for i in config.interfaces}
        self.subnets: list[Subnet] = []
        for p in config.dhcp.pools:
            iface = config.interface(p.interface)
            if iface is None:
                continue
            self.subnets.append(Subnet(iface.subnet, iface.name, int(p.start), int(p.end),
                                       str(p.router) if p.router else None, [str(d) for d in p.dns], p.domain))
        for r in config.dhcp.relay_subnets:
            self.subnets.append(Subnet(r.subnet, r.interface, int(r.start), int(r.end),
                                       str(r.router) if r.router else None, [str(d) for d in r.dns], r.domain))
        self.lease_time = config.dhcp.lease_time
        ld = config.dhcp.loaders
        self.ipxe_loaders = {ld.bios, ld.uefi_ia32, ld.uefi_x64, ld.uefi_arm64, ld.uefi_http}
        self.http_port = config.http.port

    # -- helpers ---------------------------------------------------------------------------------
    def subnet_for(self, msg: DhcpMessage, iface: ServedInterface) -> Optional[Subnet]:
        """Relayed: the subnet holding giaddr; direct: the pool on the receiving interface."""
        if msg.giaddr != "0.0.0.0":
            g = _ip2int(msg.giaddr)
            for s in self.subnets:
                if s.contains(g):
                    return s
            return None
        for s in self.subnets:
            if s.interface == iface.name:
                return s
        return None

    def subnet_of_ip(self, ip: str, iface: ServedInterface) -> Optional[Subnet]:
        n = _ip2int(ip)
        for s in self.subnets:
            if s.contains(n):
                return s
        return None

    def boot_choice(self, mac: str) -> str:
        """The host's menu flavour from its boot plan's settings (bootd/bootplan.py): picks the loader."""
        return settings_of(self.config, mac, self.hosts.get(mac)).boot

    def _url_host(self, server: str) -> str:
        """{host} of the URL templates: the address, with the port unless it is HTTP's own."""
        return server if self.http_port == 80 else f"{server}:{self.http_port}"

    def ipxe_script_url(self, server: str, mac: str) -> str:
        return self.dhcp.ipxe_script_url.format(server=server, http_port=self.http_port,
                                                host=self._url_host(server), mac=mac)

    def boot_target(self, fw: Firmware, mac: str, server: str) -> Optional[str]:
        """The file name (or URL) this client should boot next; None if it gets no boot info."""
        if not fw.boots:
            return None
        settings = settings_of(self.config, mac, self.hosts.get(mac))
        choice = settings.boot
        if fw.ipxe and choice == "ipxe":
            return self.ipxe_script_url(server, mac)
        loader = loader_for(fw, self.dhcp.loaders, choice, settings.secureboot)
        if fw.ipxe and (loader is None or loader in self.ipxe_loaders):
            # a pxelinux/grub host whose firmware has no such loader: never hand iPXE to iPXE (a loop)
            return self.ipxe_script_url(server, mac)
        if loader is None:
            return None
        if fw.http:
            if self._no_http_boot(settings):
                return None  # the signed GRUB would load and then fail to fetch its menu (http_boot_problem)
            return self.dhcp.http_boot_url.format(server=server, http_port=self.http_port,
                                                  host=self._url_host(server), file=loader)
        return loader

    def _no_http_boot(self, settings: HostSettings) -> bool:
        """A Secure Boot PC while the signed GRUB has no HTTP client: no boot file over HTTP."""
        return settings.secureboot and not self.secureboot_http

    def http_boot_problem(self, fw: Firmware, mac: str) -> Optional[str]:
        """Why a UEFI HTTP boot client of this host's room gets no boot file, if it is that."""
        if fw.http and not fw.ipxe and self._no_http_boot(settings_of(self.config, mac, self.hosts.get(mac))):
            return ("UEFI HTTP boot of a Secure Boot PC: the signed GRUB beside shim has no HTTP client "
                    "(Debian 12's grub-efi-amd64-signed fetches over TFTP only), so it would stop at its prompt; "
                    "this PC gets no boot file over HTTP. Let its firmware PXE-boot (IPv4) instead: shim and "
                    "GRUB over TFTP, Secure Boot on")
        return None

    def known(self, mac: str) -> bool:
        return mac in self.hosts or mac in self.reservations

    # -- entry point ------------------------------------------------------------------------------
    def handle(self, msg: DhcpMessage, iface: ServedInterface, port: int, now: float,
               src: Optional[tuple[str, int]] = None) -> Outcome:
        if self.mode == "off":
            return Outcome(ignored="dhcp-off")
        if msg.op != BOOTREQUEST:
            return Outcome(ignored="not-a-request")
        if msg.htype != 1 or msg.hlen != 6:
            return Outcome(ignored="not-ethernet")
        mtype = msg.message_type
        if mtype is None:
            return Outcome(ignored="bootp")
        if self.mode == "proxy":
            return self._proxy(msg, mtype, iface, port, now, src)
        if port == PROXY_PORT:
            return Outcome(ignored="port-4011-in-full-mode")
        if mtype == DISCOVER:
            return self._discover(msg, iface, now)
        if mtype == REQUEST:
            return self._request(msg, iface, now)
        if mtype == RELEASE:
            return self._release(msg, now)
        if mtype == DECLINE:
            return self._decline(msg, iface, now)
        if mtype == INFORM:
            return self._inform(msg, iface, now)
        return Outcome(ignored="unexpected-type")

    # -- full mode ---------------------------------------------------------------------------------
    def _address_for(self, msg: DhcpMessage, mac: str, subnet: Subnet, now: float) -> tuple[Optional[str], str]:
        """The address to offer this client on `subnet`, or (None, reason)."""
        reserved = self.reservations.get(mac)
        if reserved is not None:
            if subnet.contains(_ip2int(reserved)):
                holder = self.leases.holder(reserved, now)
                if holder in (None, mac):
                    return reserved, ""
                return None, "reserved-address-in-use"
        elif not self.dhcp.allow_unknown and mac not in self.hosts:
            return None, "unknown-host"
        holder_of = self.leases.holder
        reserved_ips = self.reserved_ips
        # 1. its current lease (also an expired or released one, if nobody else took it)
        lease = self.leases.lease_for(mac)
        if lease is not None:
            n = _ip2int(lease.ip)
            if subnet.contains(n) and subnet.in_range(n) and holder_of(lease.ip, now) in (None, mac) \
                    and reserved_ips.get(lease.ip, mac) == mac:
                return lease.ip, ""
        # 2. an outstanding offer
        off = self.leases.offer_by_mac.get(mac)
        if off is not None and holder_of(off, now) == mac and subnet.in_range(_ip2int(off)):
            return off, ""
        # 3. the address it asks for
        want = msg.requested_ip
        if want is not None:
            n = _ip2int(want)
            if subnet.in_range(n) and holder_of(want, now) is None and want not in reserved_ips \
                    and self._usable(n, subnet):
                return want, ""
        # 4. a never-used address, then any free one
        ip = self._allocate(subnet, mac, now)
        if ip is None:
            return None, "pool-exhausted"
        return ip, ""

    def _usable(self, n: int, subnet: Subnet) -> bool:
        """Not bootd's own address, not the network or broadcast address."""
        return n not in self.own_ips and n != subnet.net_int and n != (subnet.net_int | (~subnet.mask_int & 0xFFFFFFFF))

    def _allocate(self, subnet: Subnet, mac: str, now: float) -> Optional[str]:
        """A never-used address, else the free one that expired longest ago, else None.

        An exhausted pool is remembered for up to a second (or until an address is freed): the scan is
        O(pool), and a flood of DISCOVERs must not pay it per packet."""
        leases = self.leases
        if now < subnet.exhausted_until and leases.freed == subnet.exhausted_at_freed:
            return None
        size = subnet.end - subnet.start + 1
        n = subnet.cursor
        for _ in range(size):  # never-used addresses first, round robin
            if n > subnet.end:
                n = subnet.start
            ip = _int2ip(n)
            n += 1
            if not leases.ever_used(ip) and ip not in self.reserved_ips and self._usable(n - 1, subnet):
                subnet.cursor = n
                return ip
        best, best_exp = None, None
        for k in range(subnet.start, subnet.end + 1):  # then the free one that expired longest ago
            ip = _int2ip(k)
            if ip in self.reserved_ips or leases.holder(ip, now) is not None or not self._usable(k, subnet):
                continue
            lease = leases.by_ip.get(ip)
            exp = lease.expires if lease else 0.0
            if best_exp is None or exp < best_exp:
                best, best_exp = ip, exp
        if best is None:
            subnet.exhausted_until, subnet.exhausted_at_freed = now + 1.0, leases.freed
        return best

    def _base_reply(self, msg: DhcpMessage, mtype: int, server: str) -> DhcpMessage:
        return DhcpMessage(op=BOOTREPLY, htype=msg.htype, hlen=msg.hlen, hops=0, xid=msg.xid, secs=0,
                           flags=msg.flags, giaddr=msg.giaddr, chaddr=msg.chaddr,
                           options={53: _MTYPE[mtype], 54: _inet_aton(server)})

    def _add_config_options(self, reply: DhcpMessage, subnet: Optional[Subnet], mac: str,
                            lease_time: Optional[int]) -> None:
        o = reply.options
        if lease_time is not None:
            o[51] = _U32.pack(lease_time)
            o[58] = _U32.pack(lease_time // 2)
            o[59] = _U32.pack(lease_time * 7 // 8)
        if subnet is not None:
            o[1] = subnet.mask
            if subnet.router:
                o[3] = _inet_aton(subnet.router)
            if subnet.dns:
                o[6] = b"".join(_inet_aton(d) for d in subnet.dns)
            if subnet.domain:
                o[15] = subnet.domain.encode()
        h = self.hosts.get(mac)
        if h is not None:
            o[12] = h.name.encode()

    def _add_boot_options(self, reply: DhcpMessage, req: DhcpMessage, fw: Firmware, mac: str, server: str,
                          proxy: bool) -> Optional[str]:
        target = self.boot_target(fw, mac, server)
        if target is None:
            return None
        o = reply.options
        reply.siaddr = server
        reply.file = target.encode()[:127]
        prl = req.parameter_request_list
        if fw.http:
            o[60] = b"HTTPClient"  # UEFI HTTP boot only takes offers that say so
        elif proxy:
            # Only a proxy offer says PXEClient (with option 43): in a full offer, option 60 without 43
            # makes EDK2 take it for a boot-server offer and ask port 4011 instead of loading the file.
            o[60] = b"PXEClient"
            o[43] = PXE_VENDOR_BOOT_FILE
        if 66 in prl or proxy:
            o[66] = server.encode()
        if 67 in prl or len(target) > 127:
            o[67] = target.encode()
        if fw.ipxe and not proxy:
            o[175] = IPXE_NO_PXEDHCP
        uuid = req.options.get(97)
        if uuid is not None and (fw.pxe or fw.http):
            o[97] = uuid
        return target

    def _destination(self, msg: DhcpMessage, reply: DhcpMessage, out: Outcome, nak: bool = False) -> None:
        """RFC 2131 4.1: relay agent, else ciaddr, else broadcast (NAK, flag) or the new address."""
        if msg.giaddr != "0.0.0.0":
            out.dest = (msg.giaddr, SERVER_PORT)
            if nak:
                reply.flags |= 0x8000
        elif nak:
            out.dest, out.broadcast = ("255.255.255.255", CLIENT_PORT), True
        elif msg.ciaddr != "0.0.0.0":
            out.dest = (msg.ciaddr, CLIENT_PORT)
        elif msg.broadcast or reply.yiaddr == "0.0.0.0":
            out.dest, out.broadcast = ("255.255.255.255", CLIENT_PORT), True
        else:
            out.dest, out.link_unicast = (reply.yiaddr, CLIENT_PORT), True
        if 82 in msg.options:  # RFC 3046: echoed, as the last option
            reply.options[82] = msg.options[82]

    def _event(self, out: Outcome, msg: DhcpMessage, fw: Firmware, mac: str, iface: ServedInterface,
               **kw: object) -> None:
        if fw.boots or self.known(mac):
            d: dict[str, object] = {"type": MESSAGE_TYPE_NAMES.get(msg.message_type or 0, "?"), "arch": fw.arch,
                 "interface": iface.name, "mode": self.mode, "ipxe": fw.ipxe}
            if msg.giaddr != "0.0.0.0":
                d["relay"] = msg.giaddr
            d.update({k: v for k, v in kw.items() if v is not None})
            if fw.http and kw.get("file") is None:
                problem = self.http_boot_problem(fw, mac)
                if problem:  # a failed step on the PC's timeline, with the reason
                    d.update(step="dhcp", reason=problem)
                    out.event_kind = "failed"
            out.event = d

    def _discover(self, msg: DhcpMessage, iface: ServedInterface, now: float) -> Outcome:
        mac = msg.mac
        subnet = self.subnet_for(msg, iface)
        fw = identify(msg)
        if subnet is None:
            return Outcome(ignored="no-pool", mac=mac, firmware=fw)
        ip, why = self._address_for(msg, mac, subnet, now)
        if ip is None:
            return Outcome(ignored=why, mac=mac, firmware=fw)
        self.leases.hold_offer(ip, mac, now + self.dhcp.offer_hold)
        reply = self._base_reply(msg, OFFER, iface.ip)
        reply.yiaddr = ip
        self._add_config_options(reply, subnet, mac, self.lease_time)
        target = self._add_boot_options(reply, msg, fw, mac, iface.ip, proxy=False)
        out = Outcome(reply=reply, mac=mac, firmware=fw)
        self._destination(msg, reply, out)
        self._event(out, msg, fw, mac, iface, offered=ip, file=target)
        return out

    def _nak(self, msg: DhcpMessage, iface: ServedInterface, why: str) -> Outcome:
        reply = self._base_reply(msg, NAK, iface.ip)
        reply.options[56] = why.encode()
        out = Outcome(reply=reply, mac=msg.mac)
        self._destination(msg, reply, out, nak=True)
        asked = msg.requested_ip or msg.ciaddr
        self._failed(out, msg, iface, f"dhcp: NAK for {asked} ({why})", ip=asked)
        return out

    def _failed(self, out: Outcome, msg: DhcpMessage, iface: ServedInterface, reason: str, **kw: str) -> None:
        """A failed boot step (bootd/hoststate.py) for a PC that boots or that bootd knows; the server
        records it and logs it at WARNING with the host's name. Strangers get no event (a flood)."""
        fw = identify(msg)
        if fw.boots or self.known(msg.mac):
            out.event = {"step": "dhcp", "reason": reason, "interface": iface.name, **kw}
            out.event_kind = FAILED_STEP

    def _request(self, msg: DhcpMessage, iface: ServedInterface, now: float) -> Outcome:
        mac = msg.mac
        fw = identify(msg)
        sid = msg.server_id
        if sid is not None and sid != iface.ip:
            # SELECTING another server's offer: ours is free again
            self.leases.drop_offer(mac)
            return Outcome(ignored="other-server", mac=mac, firmware=fw)
        requested = msg.requested_ip
        renewing = requested is None
        want = msg.ciaddr if requested is None else requested
        if renewing and want == "0.0.0.0":
            return Outcome(ignored="request-without-address", mac=mac, firmware=fw)
        subnet = self.subnet_for(msg, iface) if msg.giaddr != "0.0.0.0" or not renewing \
            else self.subnet_of_ip(want, iface)
        if subnet is None or not subnet.contains(_ip2int(want)):
            if sid is None and renewing:
                return Outcome(ignored="not-our-subnet", mac=mac, firmware=fw)
            return self._nak(msg, iface, "wrong network")
        n = _ip2int(want)
        holder = self.leases.holder(want, now)
        reserved = self.reservations.get(mac)
        owner = self.reserved_ips.get(want)
        ok = True
        if holder is not None and holder != mac:
            ok = False
        elif owner is not None and owner != mac:
            ok = False
        elif reserved is not None and reserved != want and subnet.contains(_ip2int(reserved)):
            ok = False  # it must move to its reservation
        elif owner is None and not subnet.in_range(n):
            ok = False
        elif reserved is None and not self.dhcp.allow_unknown and mac not in self.hosts:
            return Outcome(ignored="unknown-host", mac=mac, firmware=fw)
        if not ok:
            if sid is None and renewing and holder is None:
                return Outcome(ignored="not-ours", mac=mac, firmware=fw)
            return self._nak(msg, iface, "address not available")
        cid = msg.client_id
        self.leases.bind(want, mac, now + self.lease_time, now, cid.hex() if cid else None, msg.hostname)
        reply = self._base_reply(msg, ACK, iface.ip)
        reply.ciaddr = msg.ciaddr
        reply.yiaddr = want
        self._add_config_options(reply, subnet, mac, self.lease_time)
        target = self._add_boot_options(reply, msg, fw, mac, iface.ip, proxy=False)
        out = Outcome(reply=reply, mac=mac, firmware=fw)
        self._destination(msg, reply, out)
        self._event(out, msg, fw, mac, iface, ip=want, file=target)
        return out

    def _release(self, msg: DhcpMessage, now: float) -> Outcome:
        sid = msg.server_id
        if sid is not None and sid not in (i.ip for i in self.interfaces.values()):
            return Outcome(ignored="other-server", mac=msg.mac)
        if not self.leases.release(msg.ciaddr, msg.mac, now):
            return Outcome(ignored="release-unknown-lease", mac=msg.mac)
        return Outcome(ignored="release", mac=msg.mac)

    def _decline(self, msg: DhcpMessage, iface: ServedInterface, now: float) -> Outcome:
        ip = msg.requested_ip
        sid = msg.server_id
        if ip is None or (sid is not None and sid != iface.ip):
            return Outcome(ignored="decline-not-ours", mac=msg.mac)
        if self.subnet_of_ip(ip, iface) is None:
            return Outcome(ignored="decline-not-ours", mac=msg.mac)
        # Only the holder of a live lease on `ip` may decline it (Kea: DECLINE_LEASE_NOT_FOUND /
        # _MISMATCH; dnsmasq acts only on the sender's own lease): otherwise any stranger could
        # quarantine a reserved host's address, or the whole pool, one DECLINE per address.
        lease = self.leases.by_ip.get(ip)
        if lease is None or lease.state != BOUND or lease.expires <= now:
            return Outcome(ignored="decline-lease-not-found", mac=msg.mac)
        cid = msg.client_id
        if lease.mac != msg.mac or lease.client_id != (cid.hex() if cid else None):
            return Outcome(ignored="decline-lease-mismatch", mac=msg.mac)
        self.leases.decline(ip, msg.mac, now + self.dhcp.decline_quarantine, now)
        out = Outcome(ignored="decline", mac=msg.mac)
        self._failed(out, msg, iface, f"dhcp: the PC declined {ip} (another machine answers on that address)",
                     ip=ip)
        return out

    def _inform(self, msg: DhcpMessage, iface: ServedInterface, now: float) -> Outcome:
        mac = msg.mac
        fw = identify(msg)
        if msg.ciaddr == "0.0.0.0":
            return Outcome(ignored="inform-without-ciaddr", mac=mac, firmware=fw)
        reply = self._base_reply(msg, ACK, iface.ip)
        reply.ciaddr = msg.ciaddr
        reply.flags = msg.flags
        self._add_config_options(reply, self.subnet_of_ip(msg.ciaddr, iface), mac, None)
        target = self._add_boot_options(reply, msg, fw, mac, iface.ip, proxy=False)
        out = Outcome(reply=reply, mac=mac, firmware=fw)
        if msg.giaddr != "0.0.0.0":
            out.dest = (msg.giaddr, SERVER_PORT)
        else:
            out.dest = (msg.ciaddr, CLIENT_PORT)
        if 82 in msg.options:
            reply.options[82] = msg.options[82]
        self._event(out, msg, fw, mac, iface, file=target)
        return out

    # -- proxy mode ---------------------------------------------------------------------------------
    def _proxy(self, msg: DhcpMessage, mtype: int, iface: ServedInterface, port: int, now: float,
               src: Optional[tuple[str, int]]) -> Outcome:
        mac = msg.mac
        fw = identify(msg)
        if not (fw.pxe or fw.http):
            return Outcome(ignored="not-pxe", mac=mac, firmware=fw)
        target = self.boot_target(fw, mac, iface.ip)
        if target is None:
            return Outcome(ignored="no-loader-for-arch", mac=mac, firmware=fw)
        if port == PROXY_PORT:
            if mtype not in (REQUEST, INFORM):
                return Outcome(ignored="unexpected-type", mac=mac, firmware=fw)
            reply = self._base_reply(msg, ACK, iface.ip)
            reply.ciaddr = msg.ciaddr
            self._add_boot_options(reply, msg, fw, mac, iface.ip, proxy=True)
            out = Outcome(reply=reply, mac=mac, firmware=fw, event_kind="proxydhcp")
            if src is not None and src[0] != "0.0.0.0":
                out.dest = src
            elif msg.ciaddr != "0.0.0.0":
                out.dest = (msg.ciaddr, CLIENT_PORT)
            else:
                out.dest, out.broadcast = ("255.255.255.255", CLIENT_PORT), True
            self._event(out, msg, fw, mac, iface, file=target, port=PROXY_PORT)
            return out
        if mtype != DISCOVER:
            # REQUESTs on 67 are for the site's DHCP server's offer; that server answers them
            return Outcome(ignored="proxy-not-discover", mac=mac, firmware=fw)
        reply = self._base_reply(msg, OFFER, iface.ip)
        self._add_boot_options(reply, msg, fw, mac, iface.ip, proxy=True)
        out = Outcome(reply=reply, mac=mac, firmware=fw, event_kind="proxydhcp")
        if msg.giaddr != "0.0.0.0":
            out.dest = (msg.giaddr, SERVER_PORT)
        else:
            out.dest, out.broadcast = ("255.255.255.255", CLIENT_PORT), True
        if 82 in msg.options:
            reply.options[82] = msg.options[82]
        self._event(out, msg, fw, mac, iface, file=target)
        return out
