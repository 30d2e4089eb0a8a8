"""The asyncio adapter on loopback: providers, limits, refusals, timeouts, events and counters.

The server runs in the test's own event loop on 127.0.0.1; clients are real (curl) or a raw UDP
socket when the test needs to misbehave (never ACK, send a WRQ, hold sessions open).
"""
from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import time

import pytest

from bootd.dhcp.leases import LeaseTable
from bootd.metrics import Metrics
from bootd.state import open_state
from bootd.tftp.events import event_kind
from bootd.tftp.limits import ServerLimits
from bootd.tftp.server import TftpServer
from bootd.tftp.session import OP_DATA, OP_ERROR, OP_OACK, SessionLimits, encode_ack, encode_request


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def curl(port: int, path: str, *opts: str) -> tuple[int, bytes]:
    p = await asyncio.create_subprocess_exec(
        "curl", "-s", "--max-time", "20", *opts, f"tftp://127.0.0.1:{port}/{path}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await p.communicate()
    return p.returncode, out


class RawClient:
    """A UDP socket speaking just enough TFTP to misbehave on purpose."""

    def __init__(self, port: int, address: str = "127.0.0.1"):
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 0))  # any 127.x address is this host's loopback: a second client address
        self.sock.setblocking(False)
        self.peer = None

    async def recv(self, timeout=5.0) -> bytes:
        loop = asyncio.get_running_loop()
        data, addr = await asyncio.wait_for(loop.sock_recvfrom(self.sock, 65536), timeout)
        self.peer = addr
        return data

    def send_rrq(self, name: str, **opts) -> None:
        self.sock.sendto(encode_request(name, "octet", opts), ("127.0.0.1", self.port))

    def send(self, data: bytes, to_listener=False) -> None:
        self.sock.sendto(data, ("127.0.0.1", self.port) if to_listener else self.peer)

    def close(self):
        self.sock.close()


def opcode(p: bytes) -> int:
    return struct.unpack("!H", p[:2])[0]


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "pxelinux.cfg").mkdir(parents=True)
    (r / "pxelinux.cfg" / "default").write_bytes(b"DEFAULT from disk\n")
    (r / "vmlinuz").write_bytes(os.urandom(300_000))
    (r / "initrd.img").write_bytes(os.urandom(70_000))
    return r


async def start(root, **kw) -> TftpServer:
    server = TftpServer(str(root), **kw)
    await server.start([("127.0.0.1", 0)])
    return server


def port_of(server: TftpServer) -> int:
    return server.addresses[0][1]


def test_providers_answer_before_disk(root, tmp_path):
    async def main():
        store = open_state(tmp_path / "state.db")
        # the client's MAC comes from a live lease on its address (bootd/peers.py), as bootd's DHCP makes one
        LeaseTable(store).bind("127.0.0.1", "52:54:00:aa:bb:01", expires=time.time() + 600, now=time.time())
        calls = []

        def per_mac(path, ip, mac):
            calls.append((path, ip, mac))
            if path == "pxelinux.cfg/01-" + mac.replace(":", "-"):
                return f"DEFAULT menu-for-{mac}\n"
            return None

        async def grub(path, ip, mac):
            await asyncio.sleep(0)
            return b"set default=0\n"

        def broken(path, ip, mac):
            raise RuntimeError("renderer bug")

        server = await start(root, store=store, metrics=Metrics())
        server.add_provider(per_mac, "pxelinux.cfg/*")
        server.add_provider(grub, re.compile(r"grub/grub\.cfg-.*"))
        server.add_provider(broken, "broken/*")
        port = port_of(server)
        try:
            rc, out = await curl(port, "pxelinux.cfg/01-52-54-00-aa-bb-01")
            assert rc == 0 and out == b"DEFAULT menu-for-52:54:00:aa:bb:01\n"
            rc, out = await curl(port, "pxelinux.cfg/default")   # provider said None: the disk file
            assert rc == 0 and out == b"DEFAULT from disk\n"
            rc, out = await curl(port, "grub/grub.cfg-01-52-54-00-aa-bb-01")
            assert rc == 0 and out == b"set default=0\n"
            rc, out = await curl(port, "broken/x")
            assert rc != 0 and out == b""
            rc, out = await curl(port, "vmlinuz")                 # no provider matches: not asked
            assert rc == 0 and out == (root / "vmlinuz").read_bytes()
            assert calls[0] == ("pxelinux.cfg/01-52-54-00-aa-bb-01", "127.0.0.1", "52:54:00:aa:bb:01")
            assert all(c[0].startswith("pxelinux.cfg/") for c in calls)
            server.remove_provider(per_mac)
            rc, out = await curl(port, "pxelinux.cfg/01-52-54-00-aa-bb-01")
            assert rc != 0
        finally:
            await server.stop()
        events = store.events("52:54:00:aa:bb:01", limit=50)
        kinds = [(e["kind"], e["detail"]["path"], e["detail"]["outcome"]) for e in events]
        assert ("menu", "pxelinux.cfg/01-52-54-00-aa-bb-01", "complete") in kinds
        assert ("kernel", "vmlinuz", "complete") in kinds
        kernel = [e for e in events if e["kind"] == "kernel"][0]
        assert kernel["nbytes"] == 300_000 and kernel["duration"] > 0
        assert server.metrics.get("tftp", "sessions_completed") == 4
        assert server.metrics.get("tftp", "errors", reason="provider") == 1
        store.close()
    run(main())


def test_event_kinds():
    assert event_kind("undionly.kpxe") == "loader"
    assert event_kind("pxelinux.0") == "loader"
    assert event_kind("grubx64.efi") == "loader"
    assert event_kind("pxelinux.cfg/default") == "menu"
    assert event_kind("grub/grub.cfg-01-aa") == "menu"
    assert event_kind("debian/vmlinuz") == "kernel"
    assert event_kind("debian/initrd.img") == "initrd"
    assert event_kind("anything", dynamic=True) == "menu"
    assert event_kind("README") == "file"
    assert event_kind("clients/52:54:00:12:34:56/viewer.conf", dynamic=True) == "config"


def test_write_request_and_malformed_requests(root):
    async def main():
        metrics = Metrics()
        server = await start(root, metrics=metrics)
        c = RawClient(port_of(server))
        try:
            c.send(encode_request("upload", "octet", opcode=2), to_listener=True)
            p = await c.recv()
            assert opcode(p) == OP_ERROR and p[2:4] == b"\x00\x02"
            c.send(b"\x00\x01no-mode", to_listener=True)
            p = await c.recv()
            assert opcode(p) == OP_ERROR and p[2:4] == b"\x00\x04"
            c.send(encode_request("vmlinuz", "mail"), to_listener=True)
            assert (await c.recv())[2:4] == b"\x00\x04"
            c.send(b"\xde\xad\xbe\xef garbage", to_listener=True)   # not a request: dropped silently
            c.send(encode_ack(3), to_listener=True)
            with pytest.raises(asyncio.TimeoutError):
                await c.recv(timeout=0.3)
            assert metrics.get("tftp", "malformed") == 3
            assert metrics.get("tftp", "refused", reason="write") == 1
            # the server still serves
            rc, out = await curl(port_of(server), "initrd.img")
            assert rc == 0 and out == (root / "initrd.img").read_bytes()
        finally:
            c.close()
            await server.stop()
    run(main())


def test_silent_client_is_dropped_and_its_session_freed(root):
    async def main():
        limits = SessionLimits(timeout=0.1, max_timeout=0.2, retries=2)
        server = await start(root, limits=limits, metrics=Metrics())
        c = RawClient(port_of(server))
        try:
            c.send_rrq("vmlinuz")
            c.send_rrq("vmlinuz")  # a client's own retransmitted RRQ: no second session
            got = []
            while True:
                p = await c.recv(timeout=3)
                got.append(opcode(p))
                if opcode(p) == OP_ERROR:
                    break
            assert got == [OP_DATA, OP_DATA, OP_DATA, OP_ERROR]   # first send + 2 retries, then give up
            await asyncio.sleep(0.05)
            st = server.status()
            assert st["active_sessions"] == 0 and st["open_files"] == 0 and st["failed"] == 1
            assert server.metrics.get("tftp", "sessions_failed", reason="timeout") == 1
            assert server.metrics.get("tftp", "ignored", reason="duplicate-request") == 1
        finally:
            c.close()
            await server.stop()
    run(main())


def test_session_and_open_file_limits_answer_busy(root):
    async def main():
        server = await start(root, server_limits=ServerLimits(max_sessions=3, max_open_files=2), metrics=Metrics())
        port = port_of(server)
        holders = [RawClient(port) for _ in range(4)]
        try:
            # two files open, shared by sessions reading the same one
            for c, name in zip(holders, ["vmlinuz", "initrd.img", "vmlinuz"], strict=False):  # the 4th waits
                c.send_rrq(name, blksize=1024)
                assert opcode(await c.recv()) == OP_OACK
            assert server.status()["active_sessions"] == 3 and server.status()["open_files"] == 2
            holders[3].send_rrq("vmlinuz")
            p = await holders[3].recv()
            assert opcode(p) == OP_ERROR and b"busy" in p
            # finish one session: room again, but a third distinct file exceeds the open-file cap
            holders[1].send(b"\x00\x05\x00\x00cancel\x00")
            for _ in range(50):
                if server.status()["active_sessions"] == 2:
                    break
                await asyncio.sleep(0.01)
            assert server.status()["open_files"] == 1
            (root / "third").write_bytes(b"3")
            (root / "fourth").write_bytes(b"4")
            holders[3].send_rrq("third")
            assert (await holders[3].recv())[:2] == b"\x00\x03"
            c5 = RawClient(port)
            holders.append(c5)
            c5.send_rrq("fourth")
            p = await c5.recv()
            assert opcode(p) == OP_ERROR and b"busy" in p
            assert server.metrics.get("tftp", "refused", reason="busy") == 2
        finally:
            for c in holders:
                c.close()
            await server.stop()
    run(main())


def test_one_address_cannot_take_every_session(root):
    """max_sessions_per_client: a fourth transfer from one address gets a busy ERROR (counted) while
    another address still gets its file; a slot freed by that address is its own again."""
    async def main():
        server = await start(root, server_limits=ServerLimits(max_sessions=10, max_sessions_per_client=3),
                             metrics=Metrics())
        port = port_of(server)
        holders = [RawClient(port) for _ in range(4)]
        other = RawClient(port, address="127.0.0.2")
        try:
            for c in holders[:3]:
                c.send_rrq("vmlinuz", blksize=1024)
                assert opcode(await c.recv()) == OP_OACK
            holders[3].send_rrq("vmlinuz", blksize=1024)
            p = await holders[3].recv()
            assert opcode(p) == OP_ERROR and b"busy" in p and b"from this address" in p
            assert server.metrics.get("tftp", "refused", reason="per-client") == 1
            assert server.status()["active_sessions"] == 3
            # another address: the whole file, lock-step
            other.send_rrq("initrd.img")
            got = bytearray()
            while True:
                p = await other.recv()
                assert opcode(p) == OP_DATA
                got += p[4:]
                other.send(encode_ack(struct.unpack("!H", p[2:4])[0]))
                if len(p) < 516:
                    break
            assert bytes(got) == (root / "initrd.img").read_bytes()
            # one of the three ends: the address has a slot again
            holders[0].send(b"\x00\x05\x00\x00cancel\x00")
            for _ in range(100):
                if server.status()["active_sessions"] == 2:
                    break
                await asyncio.sleep(0.01)
            holders[3].send_rrq("vmlinuz", blksize=1024)
            assert opcode(await holders[3].recv()) == OP_OACK
            assert server.metrics.get("tftp", "refused", reason="per-client") == 1
        finally:
            for c in holders + [other]:
                c.close()
            await server.stop()
    run(main())


def test_stop_aborts_running_transfers_with_an_error(root):
    async def main():
        server = await start(root)
        c = RawClient(port_of(server))
        try:
            c.send_rrq("vmlinuz")
            assert opcode(await c.recv()) == OP_DATA
            await server.stop()
            p = await c.recv()
            assert opcode(p) == OP_ERROR and b"shutting down" in p
            assert server.status()["active_sessions"] == 0
        finally:
            c.close()
    run(main())


def test_reads_are_chunked_and_served_from_many_sessions(root):
    """Two dozen curl clients at once on one file, with different block sizes: all byte-identical."""
    async def main():
        big = os.urandom(3 * 1024 * 1024 + 5)
        (root / "big").write_bytes(big)
        server = await start(root, server_limits=ServerLimits(max_sessions_per_client=24))  # all from 127.0.0.1
        port = port_of(server)
        try:
            jobs = [curl(port, "big", "--tftp-blksize", str(bs)) for bs in (512, 1468, 8192, 65464) * 6]
            results = await asyncio.gather(*jobs)
            assert all(rc == 0 and out == big for rc, out in results)
            assert server.status()["active_sessions"] == 0 and server.status()["open_files"] == 0
        finally:
            await server.stop()
    run(main())
