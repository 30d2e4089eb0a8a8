"""The NBD hand-off (nbdexport/handoff.c) when the daemon's read of the unix connection is already under
way as bootd's token arrives.

qemu-storage-daemon starts reading a connection's first request as soon as it has sent the reply to
NBD_OPT_GO, while the gatekeeper is still relaying that reply to the client; the gatekeeper then hands
the client's socket over and writes its token into the unix connection. A hand-off decided before the
daemon's read (is a socket pending? is a token there?) can be made just before the token comes, and the
read that follows then returns the token to qemu as if it were the start of an NBD request: qemu waits
for the rest of that request on a connection bootd has closed and drops it, and the client, whose
socket is never read, waits for answers that never come (the storm benchmark's hung PC, ~1 in 600).

On a busy machine that needs the daemon to lose its CPU between the check and the read. Here a second
preload library, loaded after handoff.c's, makes it happen every time: before a read of one of the
daemon's NBD unix connections it waits until something arrives there (as a preempted daemon would find
it when it runs again). The client is a raw socket that sends its reads right after the GO reply, as
the benchmark's PCs and Linux's nbd-client do."""
from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import textwrap
from concurrent.futures import ThreadPoolExecutor

from nbdtest import Harness, make_base

from nbdexport.qsd import StorageDaemon

IHAVEOPT = 0x49484156454F5054
OPT_GO = 7
REP_ACK = 1
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# Loaded after handoff.c (LD_PRELOAD order): handoff.c's recvmsg calls this one, which calls libc's.
LATE_READ = textwrap.dedent(r"""
    #define _GNU_SOURCE
    #include <dlfcn.h>
    #include <poll.h>
    #include <string.h>
    #include <sys/socket.h>
    #include <sys/un.h>

    static ssize_t (*next)(int, struct msghdr *, int);

    ssize_t recvmsg(int fd, struct msghdr *msg, int flags) {
        if (!next)
            next = dlsym(RTLD_NEXT, "recvmsg");
        struct sockaddr_un a;
        socklen_t l = sizeof a;
        memset(&a, 0, sizeof a);
        if (!(flags & MSG_PEEK) && getsockname(fd, (struct sockaddr *)&a, &l) == 0 && a.sun_family == AF_UNIX) {
            a.sun_path[sizeof a.sun_path - 1] = 0;
            if (strstr(a.sun_path, "nbd.sock") != NULL) { /* bound as .nbd.sock.PID, then renamed */
                struct pollfd p = {.fd = fd, .events = POLLIN};
                poll(&p, 1, 3000); /* the read waits for what comes next, as a preempted daemon's would */
            }
        }
        return next(fd, msg, flags);
    }
""")


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def _boot_reads(port: int, name: str) -> list[bytes]:
    """Fixed-newstyle handshake with NBD_OPT_GO, then 4 reads sent at once right after the GO reply."""
    s = socket.create_connection(("127.0.0.1", port), timeout=15)  # a bound for a hung connection, no more
    try:
        greeting = _recv_exact(s, 18)
        assert greeting[:8] == b"NBDMAGIC"
        raw = name.encode()
        go = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
        s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_GO, len(go)) + go)
        while True:  # NBD_REP_INFO replies, then the ACK
            _magic, _opt, rtype, rlen = struct.unpack(">QIII", _recv_exact(s, 20))
            _recv_exact(s, rlen)
            assert not rtype & (1 << 31), hex(rtype)
            if rtype == REP_ACK:
                break
        s.sendall(b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, h, h * 4096, 4096) for h in range(4)))
        got = []
        try:
            for _ in range(4):
                magic, err, _handle = struct.unpack(">IIQ", _recv_exact(s, 16))
                assert (magic, err) == (SIMPLE_REPLY_MAGIC, 0)
                got.append(_recv_exact(s, 4096)[:4])
        except (TimeoutError, ConnectionError) as e:
            raise AssertionError(f"{len(got)} of 4 reads answered after the hand-off ({e!r})") from e
        return got
    finally:
        s.close()


def test_handoff_when_the_daemon_reads_before_the_token_arrives(tmp_path):
    shim_c = tmp_path / "late_read.c"
    shim_c.write_text(LATE_READ)
    shim = tmp_path / "late_read.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(shim_c), "-ldl"], check=True)

    class LateReadingDaemon(StorageDaemon):
        async def start(self) -> None:
            assert self.extra_env.get("LD_PRELOAD"), "the hand-off library is not preloaded"
            self.extra_env = {**self.extra_env, "LD_PRELOAD": f"{self.extra_env['LD_PRELOAD']}:{shim}"}
            await super().start()

    base = make_base(tmp_path / "b.qcow2", size_mb=16)
    h = Harness(tmp_path, gatekeeper=True, daemon=LateReadingDaemon).start()
    try:
        h.m.access.may_open = lambda ip, name: True  # loopback clients, no host table: not what this is about
        assert h.m.handoff.ready(h.m.qsd.pid)
        macs = [f"52:54:00:00:01:{i:02x}" for i in range(4)]
        names = [h.run(h.m.prepare_boot(mac, base)).name for mac in macs]

        def clients() -> list[list[bytes]]:  # one alone, then the others at once
            first = _boot_reads(h.port, names[0])
            with ThreadPoolExecutor(len(names)) as pool:
                return [first, *pool.map(lambda n: _boot_reads(h.port, n), names[1:])]

        for got in h.run(asyncio.to_thread(clients)):  # the gatekeeper runs on the harness's loop meanwhile
            assert got == [b"\xab" * 4] * 4
        g = h.m.status()["gatekeeper"]
        assert g["handed_off"] == len(names) and g["spliced"] == 0, g
        for name in names:  # the daemon read every client's requests on the client's own socket
            assert h.m.export_io(name)["read_requests"] == 4
    finally:
        h.stop()
