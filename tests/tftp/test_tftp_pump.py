"""The C data pump (bootd/tftp/pump.c) against the Python data path, on loopback with raw clients.

The same scripted client runs against a TftpServer with `data_pump="c"` and one with "python" (the
sans-IO ReadSession, the reference): both must answer every ACK, duplicate ACK, old ACK, ACK inside a
window and ERROR with the same DATA packets. Then the pump's own failure modes: killed with kill -9
mid-transfer (restarted, the lost session freed, new transfers pumped again) and no C compiler (the
server falls back to Python and says so).
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct

import pytest

import bootd.tftp.pump as pump_mod
from bootd.metrics import Metrics
from bootd.state import open_state
from bootd.tftp.server import TftpServer
from bootd.tftp.session import (
    OP_DATA,
    OP_ERROR,
    OP_OACK,
    SessionLimits,
    encode_ack,
    encode_error,
    encode_request,
    parse_oack,
)

MODES = ["c", "python"]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def op(p: bytes) -> int:
    return struct.unpack("!H", p[:2])[0]


def blk(p: bytes) -> int:
    return struct.unpack("!H", p[2:4])[0]


class Client:
    """A raw TFTP client on loopback that does exactly what the test tells it to."""

    def __init__(self, port: int):
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.peer = None
        self.data_packets = 0

    async def recv(self, timeout=5.0) -> bytes:
        loop = asyncio.get_running_loop()
        data, addr = await asyncio.wait_for(loop.sock_recvfrom(self.sock, 65536), timeout)
        self.peer = addr
        if op(data) == OP_DATA:
            self.data_packets += 1
        return data

    async def quiet(self, wait=0.1) -> list[bytes]:
        """Everything that arrives until nothing has come for `wait` seconds."""
        got = []
        while True:
            try:
                got.append(await self.recv(timeout=wait))
            except asyncio.TimeoutError:
                return got

    def rrq(self, name: str, **opts) -> None:
        self.sock.sendto(encode_request(name, "octet", {k: str(v) for k, v in opts.items()}),
                         ("127.0.0.1", self.port))

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.peer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    (r / "blocks").write_bytes(os.urandom(512 * 20 + 100))   # 20 blocks of 512 and a short 21st
    (r / "even").write_bytes(os.urandom(512 * 8))            # 8 full blocks and an empty 9th
    (r / "kernel").write_bytes(os.urandom(300_000))
    return r


async def start(root, mode, tmp_path, **kw) -> TftpServer:
    store = kw.pop("store", None)
    server = TftpServer(str(root), metrics=Metrics(), data_pump=mode, store=store, **kw)
    await server.start([("127.0.0.1", 0)])
    assert server.pump_status()["active"] == mode
    return server


def port_of(server):
    return server.addresses[0][1]


async def settle(server, active=0):
    for _ in range(200):
        if server.status()["active_sessions"] == active:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"sessions still active: {server.status()}")


@pytest.mark.parametrize("mode", MODES)
def test_duplicate_and_old_acks_cause_no_extra_data_in_lockstep(root, tmp_path, mode):
    """Every DATA is ACKed three times, then an old ACK follows: not one DATA more than blocks."""
    async def main():
        server = await start(root, mode, tmp_path)
        c = Client(port_of(server))
        want = (root / "kernel").read_bytes()
        try:
            c.rrq("kernel", blksize=1024)
            assert op(await c.recv()) == OP_OACK
            c.send(encode_ack(0))
            got = bytearray()
            expected = 1
            while True:
                p = await c.recv()
                assert op(p) == OP_DATA and blk(p) == expected, (blk(p), expected)
                got += p[4:]
                for _ in range(3):
                    c.send(encode_ack(expected))
                c.send(encode_ack(expected - 1))      # an old ACK, long acknowledged
                if len(p) < 4 + 1024:
                    break
                expected += 1
            assert bytes(got) == want
            assert await c.quiet(0.3) == []          # nothing more: no resends, no storm
            blocks = len(want) // 1024 + 1
            assert c.data_packets == blocks
            await settle(server)
            st = server.status()
            assert st["completed"] == 1 and st["data_pump"]["sessions"] == (1 if mode == "c" else 0)
            assert server.metrics.get("tftp", "duplicate_acks") >= 2 * (blocks - 1)
            assert server.metrics.get("tftp", "retransmits") == 0
        finally:
            c.close()
            await server.stop()
    run(main())


async def script(root, mode, tmp_path) -> list:
    """A windowed exchange with losses, ACKs inside the window and duplicate ACKs; returns what came back
    after each step as (opcode, block) pairs."""
    server = await start(root, mode, tmp_path)
    c = Client(port_of(server))
    trace = []

    async def step(packet: bytes):
        c.send(packet)
        trace.append([(op(p), blk(p) if op(p) == OP_DATA else 0) for p in await c.quiet()])

    try:
        c.rrq("blocks", windowsize=4)
        first = await c.recv()
        assert op(first) == OP_OACK and parse_oack(first) == {"windowsize": "4"}
        await step(encode_ack(0))        # window 1-4
        await step(encode_ack(2))        # ACK inside the window: 3 and 4 lost, continue from 3
        await step(encode_ack(2))        # duplicate of the block before the window: resend it once
        await step(encode_ack(2))        # again: left to the timer
        await step(encode_ack(1))        # older than the window: ignored
        await step(encode_ack(9))        # not sent yet: ignored
        await step(encode_ack(6))        # the whole window: next one
        await step(b"\x00\x03\x00\x01xx")  # a DATA from the client: ignored
        await step(encode_ack(10))
        await step(encode_ack(14))
        await step(encode_ack(18))
        await step(encode_ack(20))       # the short last block 21 was lost: resent
        await step(encode_ack(21))       # the last ACK: done, nothing more
        await settle(server)
        st = server.status()
        return trace, st["completed"], server.metrics.get("tftp", "duplicate_acks")
    finally:
        c.close()
        await server.stop()


def test_windowed_script_is_the_same_from_c_and_python(root, tmp_path):
    results = {mode: run(script(root, mode, tmp_path)) for mode in MODES}
    trace, completed, dups = results["c"]
    assert results["c"] == results["python"]
    d = lambda *bs: [(OP_DATA, b) for b in bs]  # noqa: E731
    assert trace == [d(1, 2, 3, 4), d(3, 4, 5, 6), d(3, 4, 5, 6), [], [], [], d(7, 8, 9, 10), [],
                     d(11, 12, 13, 14), d(15, 16, 17, 18), d(19, 20, 21), d(21), []]
    assert completed == 1 and dups == 2


@pytest.mark.parametrize("mode", MODES)
def test_empty_last_block_and_plain_request(root, tmp_path, mode):
    """No options (no OACK: DATA 1 at once); a file of whole blocks ends with an empty DATA."""
    async def main():
        server = await start(root, mode, tmp_path)
        c = Client(port_of(server))
        try:
            c.rrq("even")
            got = bytearray()
            sizes = []
            while True:
                p = await c.recv()
                assert op(p) == OP_DATA and blk(p) == len(sizes) + 1
                sizes.append(len(p) - 4)
                got += p[4:]
                c.send(encode_ack(blk(p)))
                if len(p) < 516:
                    break
            assert sizes == [512] * 8 + [0] and bytes(got) == (root / "even").read_bytes()
            await settle(server)
            assert server.status()["completed"] == 1
        finally:
            c.close()
            await server.stop()
    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_error_from_the_client_ends_the_session(root, tmp_path, mode):
    async def main():
        store = open_state(tmp_path / "state.db")
        server = await start(root, mode, tmp_path, store=store,
                             limits=SessionLimits(timeout=0.1, max_timeout=0.2, retries=5))
        c = Client(port_of(server))
        try:
            c.rrq("kernel", blksize=1400)
            assert op(await c.recv()) == OP_OACK
            c.send(encode_ack(0))
            assert blk(await c.recv()) == 1
            c.send(encode_ack(1))
            assert blk(await c.recv()) == 2
            c.send(encode_error(0, "user cancelled"))
            assert await c.quiet(0.5) == []        # no retransmission of block 2 after the ERROR
            await settle(server)
            st = server.status()
            assert st["failed"] == 1 and st["open_files"] == 0
            assert server.metrics.get("tftp", "sessions_failed", reason="client-error") == 1
            [ev] = [e for e in store.events(None, limit=10) if e["detail"]["path"] == "kernel"]
            assert ev["detail"]["outcome"] == "client-error" and ev["nbytes"] == 1400
        finally:
            c.close()
            await server.stop()
            store.close()
    run(main())


@pytest.mark.parametrize("mode", MODES)
def test_retransmission_backoff_and_timeout(root, tmp_path, mode):
    """Silent after the OACK: the OACK is resent with a growing interval, then ERROR and the session is freed."""
    async def main():
        loop = asyncio.get_running_loop()
        server = await start(root, mode, tmp_path, limits=SessionLimits(timeout=0.1, max_timeout=0.25, retries=3))
        c = Client(port_of(server))
        try:
            c.rrq("kernel", blksize=1000)
            times, kinds = [], []
            while True:
                p = await c.recv(timeout=3)
                times.append(loop.time())
                kinds.append(op(p))
                if op(p) == OP_ERROR:
                    assert b"timeout" in p
                    break
            assert kinds == [OP_OACK] * 4 + [OP_ERROR]
            gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            assert gaps[0] >= 0.09 and gaps[1] >= 0.19 and gaps[2] >= 0.24 and gaps[3] >= 0.24
            await settle(server)
            assert server.metrics.get("tftp", "sessions_failed", reason="timeout") == 1
            assert server.status()["open_files"] == 0
        finally:
            c.close()
            await server.stop()
    run(main())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ack0", [False, True], ids=["silent-after-oack", "silent-after-data"])
def test_client_timeout_255_does_not_outlast_session_timeout(root, tmp_path, mode, ack0):
    """A client negotiates timeout=255 and goes silent: ERROR at session_timeout (1 s), not after minutes
    of 255 s retransmission intervals; the session and its file are freed."""
    async def main():
        server = await start(root, mode, tmp_path, limits=SessionLimits(timeout=1.0, retries=6, session_timeout=1.0))
        c = Client(port_of(server))
        try:
            c.rrq("kernel", timeout=255, blksize=512)
            p = await c.recv()
            assert op(p) == OP_OACK and parse_oack(p) == {"timeout": "255", "blksize": "512"}
            if ack0:
                c.send(encode_ack(0))
                p = await c.recv()
                assert op(p) == OP_DATA and blk(p) == 1
            p = await c.recv(timeout=15)                  # without the cap the next packet is 255 s away
            assert op(p) == OP_ERROR and b"timeout" in p
            await settle(server)
            assert server.metrics.get("tftp", "sessions_failed", reason="timeout") == 1
            st = server.status()
            assert st["open_files"] == 0 and st["data_pump"]["sessions"] == (1 if mode == "c" else 0)
        finally:
            c.close()
            await server.stop()
    run(main())


def test_pump_killed_mid_transfer_is_restarted(root, tmp_path):
    async def main():
        store = open_state(tmp_path / "state.db")
        server = await start(root, "c", tmp_path, store=store)
        c = Client(port_of(server))
        try:
            c.rrq("kernel")
            assert blk(await c.recv()) == 1
            pid = server.pump_status()["pid"]
            assert server.status()["active_sessions"] == 1 and server.pump_status()["running"] == 1
            os.kill(pid, signal.SIGKILL)
            await settle(server)                                   # the lost session is freed
            assert server.status()["open_files"] == 0
            for _ in range(200):
                if server.pump_status()["restarts"] == 1 and server.pump_status()["up"]:
                    break
                await asyncio.sleep(0.01)
            st = server.pump_status()
            assert st["restarts"] == 1 and st["deaths"] == 1 and st["pid"] != pid and st["active"] == "c"
            assert server.metrics.get("tftp", "pump_deaths") == 1
            assert server.metrics.get("tftp", "pump_sessions_lost") == 1
            [ev] = [e for e in store.events(None, limit=10) if e["detail"]["path"] == "kernel"]
            assert ev["detail"]["outcome"] == "aborted"
            # a new transfer goes through the new pump
            p = await asyncio.create_subprocess_exec(
                "curl", "-s", "--max-time", "20", "--tftp-blksize", "1468",
                f"tftp://127.0.0.1:{port_of(server)}/kernel", stdout=asyncio.subprocess.PIPE)
            out, _ = await p.communicate()
            assert p.returncode == 0 and out == (root / "kernel").read_bytes()
            await settle(server)
            assert server.pump_status()["sessions"] == 2 and server.status()["completed"] == 1
        finally:
            c.close()
            await server.stop()
            store.close()
        assert server.pump is None
    run(main())


def test_without_a_compiler_the_python_path_serves(root, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(pump_mod, "CC", str(tmp_path / "no-such-gcc"))

    async def main():
        server = TftpServer(str(root), metrics=Metrics(), data_pump="c", run_dir=tmp_path / "run")
        await server.start([("127.0.0.1", 0)])
        try:
            st = server.pump_status()
            assert st["mode"] == "c" and st["active"] == "python" and "compiler" in st["fallback"]
            p = await asyncio.create_subprocess_exec(
                "curl", "-s", "--max-time", "20", f"tftp://127.0.0.1:{port_of(server)}/kernel",
                stdout=asyncio.subprocess.PIPE)
            out, _ = await p.communicate()
            assert p.returncode == 0 and out == (root / "kernel").read_bytes()
            assert server.pump_status()["sessions"] == 0
        finally:
            await server.stop()
    with caplog.at_level("WARNING", logger="bootd.tftp"):
        run(main())
    assert sum("data pump is not available" in r.getMessage() for r in caplog.records) == 1


def test_dynamic_files_and_netascii_stay_in_python(root, tmp_path):
    async def main():
        server = await start(root, "c", tmp_path)
        server.add_provider(lambda path, ip, mac: b"menu\n", "menu.cfg")
        port = port_of(server)
        try:
            for url in (f"tftp://127.0.0.1:{port}/menu.cfg", f"tftp://127.0.0.1:{port}/even"):
                p = await asyncio.create_subprocess_exec("curl", "-s", "--max-time", "20", url,
                                                         stdout=asyncio.subprocess.PIPE)
                await p.communicate()
                assert p.returncode == 0
            c = Client(port)
            try:
                c.sock.sendto(encode_request("blocks", "netascii"), ("127.0.0.1", port))
                while True:
                    p = await c.recv()
                    c.send(encode_ack(blk(p)))
                    if len(p) < 516:
                        break
            finally:
                c.close()
            await settle(server)
            assert server.status()["completed"] == 3
            assert server.pump_status()["sessions"] == 1   # only the disk file in octet mode
        finally:
            await server.stop()
    run(main())
