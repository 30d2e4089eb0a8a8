"""Private network namespaces for tests: a lab network that exists only while a test runs.

A `Lab` is one server namespace holding a bridge (`br0`, 10.x) plus any number of client namespaces
joined to that bridge by veth pairs, and tap devices on the bridge for QEMU. Nothing is created
outside namespaces that the Lab made, and everything is removed afterwards, also when a test fails:
processes started in a namespace are killed before the namespace goes.
"""
from __future__ import annotations

import ipaddress
import itertools
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

_counter = itertools.count()
PREFIX = "bdt"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def unique_name(kind: str) -> str:
    return f"{PREFIX}{os.getpid() % 100000}{kind}{next(_counter)}"


class Netns:
    """One network namespace, with helpers to run programs inside it."""

    def __init__(self, name: str | None = None, create: bool = True):
        self.name = name or unique_name("n")
        self.procs: list[subprocess.Popen] = []
        if create:  # else the caller made it (Lab.add_clients creates hundreds in one `ip -batch`)
            _ip("netns", "add", self.name)
            self.run(["ip", "link", "set", "lo", "up"])

    def cmd(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.cmd(argv), check=check, timeout=timeout, **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(self.cmd(argv), **kw)
        self.procs.append(p)
        return p

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(x) for x in out.split()]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        for _ in range(3):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        _ip("netns", "delete", self.name, check=False)


@dataclass
class Client:
    ns: Netns
    ifname: str
    mac: str
    address: str | None = None


@dataclass
class Lab:
    """A bridge in a server namespace with client namespaces and taps hanging off it."""

    subnet: ipaddress.IPv4Network = field(default_factory=lambda: ipaddress.IPv4Network("10.77.0.0/24"))
    server: Netns = field(default_factory=Netns)
    bridge: str = "br0"
    clients: list[Client] = field(default_factory=list)
    extra: list[Netns] = field(default_factory=list)
    taps: list[str] = field(default_factory=list)
    _mac_counter: itertools.count = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self):
        s = self.server
        s.run(["ip", "link", "add", self.bridge, "type", "bridge", "forward_delay", "0", "stp_state", "0"])
        s.run(["sysctl", "-qw", f"net.ipv6.conf.{self.bridge}.accept_ra=0"], check=False)
        s.run(["ip", "addr", "add", f"{self.server_ip}/{self.subnet.prefixlen}", "dev", self.bridge])
        s.run(["ip", "link", "set", self.bridge, "up"])

    @property
    def server_ip(self) -> str:
        return str(self.subnet.network_address + 1)

    def next_mac(self) -> str:
        n = next(self._mac_counter)
        return "52:54:00:77:%02x:%02x" % (n >> 8 & 0xFF, n & 0xFF)

    def add_client(self, address: str | None = None, mac: str | None = None) -> Client:
        """A client namespace with `eth0` on the bridge; `address` is CIDR-less and optional."""
        ns = Netns()
        self.extra.append(ns)
        mac = mac or self.next_mac()
        outer = unique_name("v")
        _ip("link", "add", outer, "netns", self.server.name, "type", "veth", "peer", "name", "eth0",
            "netns", ns.name)
        ns.run(["ip", "link", "set", "eth0", "address", mac])
        ns.run(["ip", "link", "set", "eth0", "up"])
        self.server.run(["ip", "link", "set", outer, "master", self.bridge])
        self.server.run(["ip", "link", "set", outer, "up"])
        if address:
            ns.run(["ip", "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0"])
        c = Client(ns=ns, ifname="eth0", mac=mac, address=address)
        self.clients.append(c)
        return c

    def add_clients(self, count: int) -> list[Client]:
        """`count` client namespaces at once (a room for the storm benchmark): a handful of `ip -batch`
        runs instead of ~6 `ip` runs per client. No address; no IPv6 link-local (no RS/DAD noise)."""
        made: list[Client] = []
        names = [unique_name("n") for _ in range(count)]
        outers = [unique_name("v")[-15:] for _ in range(count)]
        macs = [self.next_mac() for _ in range(count)]
        root = "".join(f"netns add {n}\n" for n in names)
        root += "".join(f"link add {o} netns {self.server.name} type veth peer name eth0 address {m} netns {n}\n"
                        for n, o, m in zip(names, outers, macs, strict=True))
        try:
            subprocess.run(["ip", "-batch", "-"], input=root, text=True, check=True, capture_output=True)
        finally:  # whatever was created is the Lab's to remove
            for n, m in zip(names, macs, strict=True):
                ns = Netns(n, create=False)
                self.extra.append(ns)
                made.append(Client(ns=ns, ifname="eth0", mac=m))
        ports = "".join(f"link set {o} master {self.bridge}\nlink set {o} up\n" for o in outers)
        subprocess.run(["ip", "-n", self.server.name, "-batch", "-"], input=ports, text=True, check=True,
                       capture_output=True)
        for c in made:
            subprocess.run(["ip", "-n", c.ns.name, "-batch", "-"], check=True, capture_output=True, text=True,
                           input="link set lo up\nlink set eth0 addrgenmode none\nlink set eth0 up\n")
        self.clients.extend(made)
        return made

    def add_interface(self, name: str, address: str | None = None) -> Netns:
        """A second link in the server namespace (veth to a separate namespace), not on the bridge."""
        peer_ns = Netns()
        self.extra.append(peer_ns)
        _ip("link", "add", name, "netns", self.server.name, "type", "veth", "peer", "name", "eth0",
            "netns", peer_ns.name)
        if address:
            self.server.run(["ip", "addr", "add", address, "dev", name])
        self.server.run(["ip", "link", "set", name, "up"])
        peer_ns.run(["ip", "link", "set", "eth0", "up"])
        return peer_ns

    def add_tap(self) -> str:
        """A tap device on the bridge, in the server namespace, for a QEMU lab PC run there."""
        name = unique_name("t")[-15:]
        self.server.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"])
        self.server.run(["ip", "link", "set", name, "master", self.bridge])
        self.server.run(["ip", "link", "set", name, "up"])
        self.taps.append(name)
        return name

    def close(self) -> None:
        for ns in self.extra:
            ns.close()
        self.server.close()


def leftover_namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{PREFIX}{os.getpid() % 100000}")]
